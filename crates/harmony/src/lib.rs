//! The harmony format: render policy + content to o200k_harmony token ids, parse completions into channels.
