"""The pure part: records, the decision and its rules, attribution, the forecast. No I/O."""
