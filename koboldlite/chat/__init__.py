"""Chat: templates rendered as transformers renders them, chat messages, and tool calls.
"""
