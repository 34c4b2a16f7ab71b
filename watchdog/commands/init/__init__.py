"""commands/init"""
