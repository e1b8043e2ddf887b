"""Moving bytes to endpoints: HTTP forwarding and WebSocket bridging."""
