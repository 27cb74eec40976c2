//! Durable storage on SQLite or PostgreSQL: policies, decisions, jobs, reviews, keys.
