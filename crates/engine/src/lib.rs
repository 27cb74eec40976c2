//! The token-level Engine trait and its embedded llama.cpp implementation with policy-prefix caching and batching.
