//! Datasets, metrics, comparisons and offline HTML reports for policies.
