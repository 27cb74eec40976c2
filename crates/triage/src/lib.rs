//! Fast triage: rules (keywords, regexes, allow/deny lists) and a learned hashed n-gram classifier.
