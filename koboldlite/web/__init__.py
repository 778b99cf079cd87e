"""The HTTP layer: routing table, access policy, connection limits and watchers, the request handler, the
server with TLS around its listening socket.
"""
