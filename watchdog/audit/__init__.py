"""The audit log: the writer, the intent journals, the record format, the reader, rendering."""
