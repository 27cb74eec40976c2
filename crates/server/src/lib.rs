//! safeguard serve: the HTTP API, OpenAI-compatible surfaces, auth, metrics, review page.
