"""The OpenAI-compatible HTTP server: request/response schemas (`protocol`), the app and its
routes (`api_server`), request handling (`serving`, `formatters`), errors, middleware,
metrics, its settings (`config`) and the launcher (`start_server`, `serve`)."""
