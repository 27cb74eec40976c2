//! Download GGUF files from a Hugging Face-compatible hub: `{endpoint}/{repo}/resolve/{revision}/{file}`,
//! `HF_ENDPOINT`/`HF_TOKEN` from the environment, resume from `<file>.part` with `Range`, sha256
//! verification against the hub's `X-Linked-ETag`/`ETag` (the LFS object id) or a user-given digest,
//! and an atomic rename on success. Redirects are followed by hand so the hub's own headers (the
//! ones carrying the LFS sha256) are seen, and the bearer token is never sent to another host.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::error::{GgufError, Result};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Short names for the official models. These point at community GGUF conversions; the names are
/// UNVERIFIED from this sandbox (no hub access): pass `<owner>/<repo>/<file>` to pick any other.
pub const KNOWN_MODELS: &[(&str, &str, &str)] = &[
    ("gpt-oss-safeguard-20b", "lmstudio-community/gpt-oss-safeguard-20b-GGUF", "gpt-oss-safeguard-20b-MXFP4.gguf"),
    ("gpt-oss-safeguard-120b", "lmstudio-community/gpt-oss-safeguard-120b-GGUF", "gpt-oss-safeguard-120b-MXFP4.gguf"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub repo: String,
    pub file: String,
}

impl ModelSpec {
    /// A known short name, or `<owner>/<repo>/<path/in/repo.gguf>`.
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some((_, repo, file)) = KNOWN_MODELS.iter().find(|(name, _, _)| *name == spec) {
            return Ok(ModelSpec { repo: repo.to_string(), file: file.to_string() });
        }
        let mut parts = spec.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(owner), Some(repo), Some(file))
                if !owner.is_empty()
                    && !repo.is_empty()
                    && !file.is_empty()
                    && !file.split('/').any(|p| p == ".." || p.is_empty()) =>
            {
                Ok(ModelSpec { repo: format!("{owner}/{repo}"), file: file.to_string() })
            }
            _ => Err(GgufError::Download(format!(
                "unknown model {spec:?}: use one of {} or <owner>/<repo>/<file.gguf>",
                KNOWN_MODELS.iter().map(|(n, _, _)| *n).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    pub fn url(&self, endpoint: &str, revision: &str) -> String {
        format!("{}/{}/resolve/{}/{}", endpoint.trim_end_matches('/'), self.repo, revision, self.file)
    }

    /// Local file name: the last path component of the file in the repo.
    pub fn local_name(&self) -> &str {
        self.file.rsplit('/').next().unwrap_or(&self.file)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub downloaded: u64,
    pub total: Option<u64>,
}

pub struct PullOptions {
    pub endpoint: String,
    pub revision: String,
    pub token: Option<String>,
    /// Expected sha256 (hex); overrides the hub's etag.
    pub sha256: Option<String>,
    pub progress: Option<Box<dyn Fn(Progress) + Send + Sync>>,
}

impl Default for PullOptions {
    /// Endpoint from `HF_ENDPOINT`, token from `HF_TOKEN`, revision `main`.
    fn default() -> Self {
        PullOptions {
            endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.into()),
            revision: "main".into(),
            token: std::env::var("HF_TOKEN").ok().filter(|s| !s.is_empty()),
            sha256: None,
            progress: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledModel {
    pub path: PathBuf,
    pub bytes: u64,
    /// The verified digest, when one was known (hub etag or user-given).
    pub sha256: Option<String>,
    /// Bytes already present in the `.part` file when this run started.
    pub resumed_from: u64,
    pub already_present: bool,
}

fn dl(msg: impl Into<String>) -> GgufError {
    GgufError::Download(msg.into())
}

fn sha256_like(value: &str) -> Option<String> {
    let v = value.trim().trim_start_matches("W/").trim_matches('"').to_ascii_lowercase();
    (v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())).then_some(v)
}

fn hash_file(path: &Path, hasher: &mut Sha256) -> Result<u64> {
    let mut f = std::fs::File::open(path).map_err(|e| GgufError::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| GgufError::io(path, e))?;
        if n == 0 {
            return Ok(n_total);
        }
        hasher.update(&buf[..n]);
        n_total += n as u64;
    }
}

/// Download `spec` into `models_dir`. Safe to re-run after an interruption: it resumes.
pub async fn pull(spec: &str, models_dir: &Path, opts: &PullOptions) -> Result<PulledModel> {
    let spec = ModelSpec::parse(spec)?;
    let span = tracing::info_span!("hub_pull", repo = %spec.repo, file = %spec.file);
    let _enter = span.enter();
    let user_sha = match &opts.sha256 {
        Some(s) => Some(sha256_like(s).ok_or_else(|| dl(format!("--sha256 {s:?} is not 64 hex digits")))?),
        None => None,
    };
    std::fs::create_dir_all(models_dir).map_err(|e| GgufError::io(models_dir, e))?;
    let dest = models_dir.join(spec.local_name());
    if dest.exists() {
        let mut hasher = Sha256::new();
        let bytes = hash_file(&dest, &mut hasher)?;
        let digest = hex::encode(hasher.finalize());
        if let Some(want) = &user_sha
            && *want != digest
        {
            return Err(dl(format!(
                "{} exists but its sha256 is {digest}, not {want}; delete it to download again",
                dest.display()
            )));
        }
        // Only a digest compared with one is verified: the file may be an earlier download that had none.
        let verified = user_sha.map(|_| digest);
        return Ok(PulledModel { path: dest, bytes, sha256: verified, resumed_from: bytes, already_present: true });
    }
    let part = models_dir.join(format!("{}.part", spec.local_name()));
    let mut hasher = Sha256::new();
    let offset = if part.exists() { hash_file(&part, &mut hasher)? } else { 0 };

    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("safeguard/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| dl(e.to_string()))?;
    let first_url = spec.url(&opts.endpoint, &opts.revision);
    let hub_host =
        reqwest::Url::parse(&first_url).map_err(|e| dl(format!("{first_url}: {e}")))?.host_str().map(str::to_string);
    let mut url = first_url.clone();
    let mut etag_sha: Option<String> = None;
    let mut response = None;
    for _hop in 0..8 {
        let parsed = reqwest::Url::parse(&url).map_err(|e| dl(format!("{url}: {e}")))?;
        let mut req = client.get(parsed.clone());
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        if let Some(token) = &opts.token
            && parsed.host_str().map(str::to_string) == hub_host
        {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(|e| dl(format!("{url}: {e}")))?;
        let headers = resp.headers();
        if etag_sha.is_none() {
            etag_sha = ["x-linked-etag", "etag"]
                .iter()
                .filter_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
                .find_map(sha256_like);
        }
        if resp.status().is_redirection() {
            let location = headers
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| dl(format!("{url}: redirect without a location")))?;
            url = parsed.join(location).map_err(|e| dl(format!("{url}: bad redirect {location:?}: {e}")))?.to_string();
            continue;
        }
        response = Some(resp);
        break;
    }
    let resp = response.ok_or_else(|| dl(format!("{first_url}: too many redirects")))?;
    let status = resp.status();
    let expected = user_sha.clone().or(etag_sha);

    let (mut written, total, append) = match status.as_u16() {
        206 => {
            let range = resp.headers().get(reqwest::header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
            // Only the bytes asked for may be appended: a server that answers another range would splice a
            // wrong piece into the model, which nothing finds without a checksum.
            let starts_at = range
                .strip_prefix("bytes ")
                .and_then(|r| r.split('-').next())
                .and_then(|start| start.trim().parse::<u64>().ok());
            if starts_at != Some(offset) {
                let _ = std::fs::remove_file(&part);
                return Err(dl(format!(
                    "{first_url}: asked for bytes from {offset}, the server sent {range:?}; the partial download was \
                     removed, run the pull again"
                )));
            }
            let total = range.rsplit('/').next().and_then(|v| v.parse::<u64>().ok());
            (offset, total, true)
        }
        200 => {
            // The server ignored the range (or there was none): start over.
            hasher = Sha256::new();
            (0, resp.content_length(), false)
        }
        416 if offset > 0 && expected.is_some() => {
            // Nothing left to fetch: the part file is complete, as its checksum will show.
            return finish(&part, &dest, offset, offset, hasher, expected);
        }
        416 if offset > 0 => {
            // Without a checksum nothing shows the part file is whole rather than something else the server
            // refuses to extend.
            let _ = std::fs::remove_file(&part);
            return Err(dl(format!(
                "{first_url}: HTTP 416 for the rest of a partial download with no checksum to check it by; the \
                 partial download was removed, run the pull again"
            )));
        }
        401 | 403 => {
            return Err(dl(format!("{first_url}: HTTP {status}: the repository needs access; set HF_TOKEN")));
        }
        404 => return Err(dl(format!("{first_url}: HTTP 404: no such repository, revision or file"))),
        _ => return Err(dl(format!("{first_url}: HTTP {status}"))),
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&part)
        .map_err(|e| GgufError::io(&part, e))?;
    let report = |downloaded| {
        if let Some(cb) = &opts.progress {
            cb(Progress { downloaded, total });
        }
    };
    report(written);
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = file.flush();
                return Err(dl(format!(
                    "download interrupted after {written} of {} bytes ({e}); run the same command again to resume",
                    total.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
                )));
            }
        };
        file.write_all(&chunk).map_err(|e| GgufError::io(&part, e))?;
        hasher.update(&chunk);
        written += chunk.len() as u64;
        report(written);
    }
    file.flush().map_err(|e| GgufError::io(&part, e))?;
    file.sync_all().map_err(|e| GgufError::io(&part, e))?;
    drop(file);
    if let Some(total) = total
        && written < total
    {
        return Err(dl(format!(
            "download interrupted after {written} of {total} bytes; run the same command again to resume"
        )));
    }
    finish(&part, &dest, written, offset, hasher, expected)
}

fn finish(
    part: &Path,
    dest: &Path,
    bytes: u64,
    resumed_from: u64,
    hasher: Sha256,
    expected: Option<String>,
) -> Result<PulledModel> {
    let digest = hex::encode(hasher.finalize());
    if let Some(want) = &expected
        && *want != digest
    {
        // A corrupt part file would fail forever on resume; drop it.
        let _ = std::fs::remove_file(part);
        return Err(dl(format!("sha256 mismatch: got {digest}, expected {want}; the partial download was removed")));
    }
    std::fs::rename(part, dest).map_err(|e| GgufError::io(dest, e))?;
    tracing::info!(path = %dest.display(), bytes, verified = expected.is_some(), "download complete");
    Ok(PulledModel {
        path: dest.to_path_buf(),
        bytes,
        sha256: expected.map(|_| digest),
        resumed_from,
        already_present: false,
    })
}
