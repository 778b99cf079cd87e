"""The service a route talks to: model files fetched, named, loaded and unloaded, and the App. Nothing here
knows HTTP.
"""
