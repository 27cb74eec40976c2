//! `hub::pull` against a local server that speaks the hub's URL layout and headers: a redirect
//! carrying `X-Linked-Etag` (the sha256), Range support, and a connection dropped mid-transfer.

use std::sync::{Arc, Mutex};

use safeguard_gguf::hub::{ModelSpec, PullOptions, pull};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Default)]
struct Seen {
    requests: Vec<(String, Option<String>, Option<String>)>, // path, range, authorization
    cdn_hits: usize,
}

/// `skew` moves the start of every range the server answers: a server that sends other bytes than asked for.
async fn serve(data: Arc<Vec<u8>>, seen: Arc<Mutex<Seen>>, drop_first: bool, skew: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sha = hex::encode(Sha256::digest(&*data));
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let data = data.clone();
            let seen = seen.clone();
            let sha = sha.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = sock.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let header = |name: &str| {
                    head.lines()
                        .find(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
                        .map(|l| l.split_once(':').unwrap().1.trim().to_string())
                };
                let range = header("range");
                let first_cdn_hit = {
                    let mut s = seen.lock().unwrap();
                    s.requests.push((path.clone(), range.clone(), header("authorization")));
                    if path.starts_with("/cdn/") {
                        s.cdn_hits += 1;
                    }
                    path.starts_with("/cdn/") && s.cdn_hits == 1
                };
                let len = data.len();
                if path == "/acme/tiny-GGUF/resolve/main/model.gguf" {
                    let resp = format!(
                        "HTTP/1.1 302 Found\r\nLocation: /cdn/model.gguf\r\nX-Linked-Etag: \"{sha}\"\r\nX-Linked-Size: {len}\r\nETag: \"W/abc\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                } else if path == "/cdn/model.gguf" {
                    if drop_first && first_cdn_hit {
                        // Promise everything, deliver 40%, hang up.
                        let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
                        let _ = sock.write_all(resp.as_bytes()).await;
                        let _ = sock.write_all(&data[..len * 2 / 5]).await;
                        let _ = sock.flush().await;
                        return;
                    }
                    let start = range
                        .as_deref()
                        .and_then(|r| r.strip_prefix("bytes="))
                        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
                        .map(|s| s + skew);
                    let resp = match start {
                        Some(s) if s >= len => format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes(),
                        Some(s) => {
                            let mut r = format!(
                                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{len}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                len - 1,
                                len - s
                            )
                            .into_bytes();
                            r.extend_from_slice(&data[s..]);
                            r
                        }
                        None => {
                            let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n").into_bytes();
                            r.extend_from_slice(&data);
                            r
                        }
                    };
                    let _ = sock.write_all(&resp).await;
                } else {
                    let _ = sock
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

fn payload() -> Arc<Vec<u8>> {
    Arc::new((0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect())
}

fn opts(endpoint: &str) -> PullOptions {
    PullOptions {
        endpoint: endpoint.to_string(),
        revision: "main".into(),
        token: Some("secret".into()),
        sha256: None,
        progress: None,
    }
}

#[tokio::test]
async fn interrupted_download_resumes_with_range_and_verifies_sha256() {
    let data = payload();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let endpoint = serve(data.clone(), seen.clone(), true, 0).await;
    let dir = tempfile::tempdir().unwrap();

    let err = pull("acme/tiny-GGUF/model.gguf", dir.path(), &opts(&endpoint)).await.unwrap_err();
    assert!(err.to_string().contains("interrupted"), "{err}");
    let part = dir.path().join("model.gguf.part");
    let partial = std::fs::metadata(&part).unwrap().len();
    assert!(partial > 0 && partial < data.len() as u64, "{partial}");
    assert!(!dir.path().join("model.gguf").exists());

    let progress = Arc::new(Mutex::new(Vec::new()));
    let p = progress.clone();
    let mut o = opts(&endpoint);
    o.progress = Some(Box::new(move |pr| p.lock().unwrap().push(pr)));
    let pulled = pull("acme/tiny-GGUF/model.gguf", dir.path(), &o).await.unwrap();
    assert_eq!(pulled.resumed_from, partial);
    assert_eq!(pulled.bytes, data.len() as u64);
    assert_eq!(pulled.sha256.as_deref(), Some(hex::encode(Sha256::digest(&*data)).as_str()));
    assert_eq!(std::fs::read(&pulled.path).unwrap(), *data);
    assert!(!part.exists());
    let last = *progress.lock().unwrap().last().unwrap();
    assert_eq!((last.downloaded, last.total), (data.len() as u64, Some(data.len() as u64)));

    {
        let s = seen.lock().unwrap();
        let resumed = s.requests.iter().rev().find(|(p, _, _)| p == "/cdn/model.gguf").unwrap();
        assert_eq!(resumed.1.as_deref(), Some(format!("bytes={partial}-").as_str()));
        assert!(s.requests.iter().all(|(_, _, auth)| auth.as_deref() == Some("Bearer secret")));
    }

    // A second pull finds the verified file and downloads nothing.
    let before = seen.lock().unwrap().requests.len();
    let again = pull("acme/tiny-GGUF/model.gguf", dir.path(), &opts(&endpoint)).await.unwrap();
    assert!(again.already_present);
    assert_eq!(again.sha256, None, "present, but not compared with any digest: not verified");
    assert_eq!(seen.lock().unwrap().requests.len(), before);
    let mut checked = opts(&endpoint);
    checked.sha256 = Some(hex::encode(Sha256::digest(&*data)));
    let again = pull("acme/tiny-GGUF/model.gguf", dir.path(), &checked).await.unwrap();
    assert_eq!(again.sha256, checked.sha256, "compared with --sha256: verified");
}

#[tokio::test]
async fn wrong_checksum_missing_files_and_bad_specs_fail_cleanly() {
    let data = payload();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let endpoint = serve(data.clone(), seen, false, 0).await;
    let dir = tempfile::tempdir().unwrap();

    let mut o = opts(&endpoint);
    o.sha256 = Some("0".repeat(64));
    let err = pull("acme/tiny-GGUF/model.gguf", dir.path(), &o).await.unwrap_err();
    assert!(err.to_string().contains("sha256 mismatch"), "{err}");
    assert!(!dir.path().join("model.gguf").exists());
    assert!(!dir.path().join("model.gguf.part").exists());

    let err = pull("acme/tiny-GGUF/missing.gguf", dir.path(), &opts(&endpoint)).await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");

    let mut o = opts(&endpoint);
    o.sha256 = Some("xyz".into());
    assert!(pull("acme/tiny-GGUF/model.gguf", dir.path(), &o).await.is_err());
    assert!(pull("not-a-model", dir.path(), &opts(&endpoint)).await.unwrap_err().to_string().contains("unknown model"));
}

/// A resumed download takes only the bytes it asked for: another range is refused and the partial file removed,
/// so the next pull starts over instead of splicing a wrong piece into the model.
#[tokio::test]
async fn a_resume_answered_with_another_range_is_refused() {
    let data = payload();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let endpoint = serve(data.clone(), seen, false, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("model.gguf.part");
    std::fs::write(&part, &data[..1000]).unwrap();
    let err = pull("acme/tiny-GGUF/model.gguf", dir.path(), &opts(&endpoint)).await.unwrap_err();
    assert!(err.to_string().contains("asked for bytes from 1000"), "{err}");
    assert!(!part.exists() && !dir.path().join("model.gguf").exists());
}

#[test]
fn specs_and_urls() {
    let s = ModelSpec::parse("gpt-oss-safeguard-20b").unwrap();
    assert!(s.file.ends_with(".gguf"));
    let s = ModelSpec::parse("owner/repo/sub/dir/f.gguf").unwrap();
    assert_eq!((s.repo.as_str(), s.file.as_str(), s.local_name()), ("owner/repo", "sub/dir/f.gguf", "f.gguf"));
    assert_eq!(s.url("https://hub.example/", "v1"), "https://hub.example/owner/repo/resolve/v1/sub/dir/f.gguf");
    assert!(ModelSpec::parse("owner/repo/../etc/passwd").is_err());
    assert!(ModelSpec::parse("owner//f.gguf").is_err());
}
