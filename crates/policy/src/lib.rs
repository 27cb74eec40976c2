//! Policy files: front matter, sections, rule ids, content-hash versions, lint, the starter library.
