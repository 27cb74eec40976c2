//! Policy versions: immutable, identified by the sha256 of their body; names point at an active version.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use safeguard_policy::{Policy, STARTER_POLICIES};
use safeguard_store::{MAX_POLICY_PAGE, PolicyListing, PolicySummary, Store, StoreError, StoredPolicy};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiPath, ApiQuery};

/// What we keep beside the body so the exact `Policy` (front matter included) can be rebuilt.
fn stored_meta(policy: &Policy, source: &str, fallback_name: Option<&str>) -> Value {
    json!({"meta": policy.meta, "source": source, "fallback_name": fallback_name})
}

/// Rebuilds a stored version by re-parsing its source, and checks it still hashes to its id.
pub(crate) fn policy_of(stored: &StoredPolicy) -> Result<Policy, ApiError> {
    let source = stored.meta.get("source").and_then(Value::as_str).unwrap_or(&stored.body);
    let fallback = stored.meta.get("fallback_name").and_then(Value::as_str).or(Some(stored.name.as_str()));
    let policy = Policy::parse_stored(source, fallback)
        .map_err(|e| ApiError::Unavailable(format!("stored policy {} no longer parses: {e}", stored.hash)))?;
    if policy.hash.to_string() != stored.hash {
        return Err(ApiError::Unavailable(format!(
            "stored policy {} re-parses to {}; refusing to use a different version",
            stored.hash, policy.hash
        )));
    }
    Ok(policy)
}

async fn store_policy(
    store: &Store,
    policy: &Policy,
    source: &str,
    fallback: Option<&str>,
    pin: bool,
) -> Result<(StoredPolicy, bool), ApiError> {
    Ok(store
        .put_policy(
            &policy.hash.to_string(),
            &policy.meta.name,
            &policy.body,
            &stored_meta(policy, source, fallback),
            pin,
        )
        .await?)
}

/// Every active policy name keeps a metrics label of its own (see [`safeguard_core::reserve_policy_label`]), read
/// once as the server starts; names pinned later are reserved as they are pinned. Only the names are read: one
/// stored version that cannot be read must not keep the server from starting.
pub(crate) async fn reserve_active_labels(store: &Store) -> Result<(), StoreError> {
    let mut after: Option<String> = None;
    loop {
        let page = store.active_policy_names(after.as_deref(), MAX_POLICY_PAGE).await?;
        for name in &page {
            safeguard_core::reserve_policy_label(name);
        }
        match page.last() {
            Some(last) if page.len() as i64 >= MAX_POLICY_PAGE => after = Some(last.clone()),
            _ => return Ok(()),
        }
    }
}

/// The shipped starter policies become the first versions of their names (a no-op when already stored). A
/// starter body stored earlier with other front matter (sent inline under the starter's name) keeps that name
/// unpinned: pinning it would serve the starter's name with someone else's settings.
pub(crate) async fn seed_starter_library(store: &Store) -> Result<(), StoreError> {
    for starter in STARTER_POLICIES {
        let stem = starter.file_name.trim_end_matches(".md");
        let policy = match Policy::parse_with_fallback_name(starter.source, Some(stem)) {
            Ok(policy) => policy,
            Err(err) => {
                tracing::error!(file = starter.file_name, error = %err, "starter policy does not parse; not served");
                continue;
            }
        };
        let hash = policy.hash.to_string();
        let meta = stored_meta(&policy, starter.source, Some(stem));
        let (stored, _) = store.put_policy(&hash, &policy.meta.name, &policy.body, &meta, false).await?;
        if stored.active {
            continue;
        }
        if !policy_of(&stored).is_ok_and(|known| known.meta == policy.meta) {
            tracing::warn!(
                file = starter.file_name, version = %hash, stored_as = %stored.name,
                "the starter policy's body is stored with other front matter; its name is left unpinned"
            );
            continue;
        }
        store.pin_first_version(&hash, &policy.meta.name, &stored.meta).await?;
    }
    Ok(())
}

/// Whether two copies of one body would be judged alike: the same front matter, names aside.
fn same_settings(a: &Policy, b: &Policy) -> bool {
    let mut b_meta = b.meta.clone();
    b_meta.name.clone_from(&a.meta.name);
    a.meta == b_meta
}

fn looks_like_hash(id: &str) -> bool {
    id.starts_with("sha256:")
}

/// Parses a policy a client sent. A `triage:` or `routing:` section the cascade cannot read (a misspelt key, a bad
/// regex, an unknown effort) is refused here: accepted, the policy would run without triage or on a more careful
/// route than asked, and only a log line would say why. The triage check is the cascade's own build, cached, so an
/// inline policy's rules compile once, not once per request.
fn parse_sent_policy(state: &AppState, text: &str, fallback_name: Option<&str>) -> Result<Policy, String> {
    // Nobody writes one, and PostgreSQL cannot store one: refused here, not as a storage failure later.
    if text.contains('\0') || fallback_name.is_some_and(|name| name.contains('\0')) {
        return Err("the policy (or its name) holds a NUL character".into());
    }
    let policy = Policy::parse_with_fallback_name(text, fallback_name).map_err(|e| e.to_string())?;
    // Front matter can spell one too (`name: "spam\0"`), past the check on the text.
    if serde_json::to_string(&policy.meta).is_ok_and(|meta| meta.contains("\\u0000")) {
        return Err("the policy's front matter holds a NUL character".into());
    }
    state.cascade.triage.try_for_policy(&policy).map_err(|e| e.to_string())?;
    safeguard_pipeline::routing_section(&policy).map_err(|e| e.to_string())?;
    Ok(policy)
}

/// What an inline policy was sent as, kept to be stored as such once the request has passed every check
/// ([`keep_inline`]), so that a refused request leaves nothing behind.
pub(crate) struct InlineText {
    text: String,
    name: Option<String>,
}

/// A policy reference in a request: `"name"` (its active version), `"sha256:…"`, or `{"text": "…"}` inline. An
/// inline one is parsed, not stored: its text comes back with it.
pub(crate) async fn resolve_policy(
    state: &AppState,
    reference: &Value,
    caller: &Caller,
) -> Result<(Policy, Option<InlineText>), ApiError> {
    let stored = |policy: Policy| (policy, None);
    match reference {
        Value::String(id) if looks_like_hash(id) => stored_policy(state, id)
            .await?
            .map(stored)
            .ok_or_else(|| ApiError::bad("unknown_policy", format!("no policy version {id}"))),
        Value::String(name) => stored_policy(state, name).await?.map(stored).ok_or_else(|| {
            ApiError::bad("unknown_policy", format!("no policy named {name:?}; POST it to /v1/policies first"))
        }),
        Value::Object(object) => {
            let text = object
                .get("text")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad("invalid_policy", "an inline policy is {\"text\": \"…\"}"))?;
            let name = object.get("name").and_then(Value::as_str);
            let policy = parse_sent_policy(state, text, Some(name.unwrap_or(INLINE_NAME)))
                .map_err(|why| ApiError::bad("invalid_policy", format!("inline policy: {why}")))?;
            if !caller.has("policies:write") {
                refuse_what_only_publishers_set(state, &policy).await?;
            }
            Ok((policy, Some(InlineText { text: text.to_string(), name: name.map(str::to_string) })))
        }
        _ => Err(ApiError::bad("invalid_policy", "a policy is a name, a \"sha256:…\" version, or {\"text\": \"…\"}")),
    }
}

/// What an inline policy may not do unless its sender could publish it. A high-risk flag or a review SLA orders
/// the review queue every client's items share (a one-minute SLA puts an item ahead of everything not yet
/// overdue), and an active policy's name would file the sender's verdicts under that policy: in its decisions, its
/// metrics and its reviewers' queue. The active version itself, sent inline, is what it is and passes.
async fn refuse_what_only_publishers_set(state: &AppState, policy: &Policy) -> Result<(), ApiError> {
    let active = stored_policy(state, &policy.meta.name).await?;
    if active.as_ref().is_some_and(|active| active.hash == policy.hash) {
        return Ok(());
    }
    let name = &policy.meta.name;
    let refused = |what: String| Err(ApiError::ForbiddenHere { scope: "policies:write", what });
    if active.is_some() {
        return refused(format!("an inline policy named {name:?}, the name of an active policy,"));
    }
    if policy.meta.high_risk {
        return refused(format!("inline policy {name:?} sets high_risk (it orders the shared review queue) and"));
    }
    if policy.meta.review_sla_secs.is_some() {
        return refused(format!("inline policy {name:?} sets review_sla (it orders the shared review queue) and"));
    }
    Ok(())
}

/// Stores an inline `policy` as it was sent (unpinned: so that the decision's policy hash can be looked up and
/// replayed; once is enough).
pub(crate) async fn keep_inline(state: &AppState, policy: &Policy, sent: &InlineText) -> Result<(), ApiError> {
    let hash = policy.hash.to_string();
    let known = match state.lookups.inline.get(&hash) {
        Some(known) => known,
        None => {
            // Recorded in use before it is stored or read: a prune that comes after keeps it, and one that
            // came before has deleted it, so the store below puts it back.
            touch(state, &hash).await;
            let name = Some(sent.name.as_deref().unwrap_or(INLINE_NAME));
            let (stored, _) = store_policy(&state.store, policy, &sent.text, name, false).await?;
            let known = match state.lookups.versions.get(&stored.hash) {
                Some(known) => known,
                None => policy_of(&stored)?,
            };
            state.lookups.inline.put(hash.clone(), known.clone());
            known
        }
    };
    // Checked again after storing: a request that stored the same body with other front matter since
    // `inline_conflict` looked would otherwise have it judged under settings its record does not show.
    if !same_settings(&known, policy) {
        return Err(settings_conflict(&hash, &known));
    }
    Ok(())
}

/// Whether an inline policy's body is known under other settings: stored so, or sent so by one of the policies
/// named before it in the same request (`earlier`). The decision names the hash, and a replay or a review reads that
/// version's stored front matter: an inline copy that routes or parses differently (its triage, `high_risk`, output
/// format) would be judged under settings its record does not show. A different name alone changes nothing it
/// decides. Checked for every policy of a request before any is stored, so that a request refused for one stores
/// none.
pub(crate) async fn inline_conflict(state: &AppState, policy: &Policy, earlier: &[Policy]) -> Result<(), ApiError> {
    let hash = policy.hash.to_string();
    if let Some(other) = earlier.iter().find(|other| other.hash == policy.hash && !same_settings(other, policy)) {
        return Err(settings_conflict(&hash, other));
    }
    let known = match state.lookups.inline.get(&hash) {
        Some(known) => Some(known),
        None => state.store.get_policy(&hash).await?.map(|stored| policy_of(&stored)).transpose()?,
    };
    match known {
        Some(known) if !same_settings(&known, policy) => Err(settings_conflict(&hash, &known)),
        _ => Ok(()),
    }
}

fn settings_conflict(hash: &str, known: &Policy) -> ApiError {
    ApiError::Conflict(format!(
        "this inline policy's body is already stored as version {hash} (policy {:?}) with different front matter; \
         a version is the hash of its body, so change the body to use these settings, or refer to the stored \
         version by its hash",
        known.meta.name
    ))
}

/// A stored policy by `"sha256:…"` version or by name (its active version), through the lookup cache; what
/// every path that decides (HTTP, jobs, NATS) resolves its policies with. `Ok(None)`: nothing by that reference.
pub(crate) async fn stored_policy(state: &AppState, reference: &str) -> Result<Option<Policy>, ApiError> {
    // Names nothing, on either store: PostgreSQL would refuse the text, which reads as a storage failure.
    if reference.contains('\0') {
        return Ok(None);
    }
    let lookups = &state.lookups;
    if looks_like_hash(reference) {
        if let Some(policy) = lookups.versions.get(reference) {
            return Ok(Some(policy));
        }
        // Recorded in use before it is read, as an inline version is.
        touch(state, reference).await;
        return match state.store.get_policy(reference).await? {
            Some(stored) => remember_version(state, &stored).map(Some),
            None => Ok(None),
        };
    }
    if let Some(policy) = lookups.active.get(reference).and_then(|hash| lookups.versions.get(&hash)) {
        return Ok(Some(policy));
    }
    let Some(stored) = state.store.active_policy(reference).await? else { return Ok(None) };
    lookups.active.put(reference.to_string(), stored.hash.clone());
    // Active, so never pruned while it is; recorded in use for after another version is activated.
    touch(state, &stored.hash).await;
    remember_version(state, &stored).map(Some)
}

/// Records that this server reads `hash` to decide with (`Store::touch_policy`), at most once per half the
/// resolution per version: the version cache forgets versions within `POLICY_USE_RESOLUTION_MS`, so a version
/// this server keeps deciding with is recorded in use at least that often, and retention never prunes it from
/// under a decision. A failed write is tried again at the next use: retention periods (days) leave hours of room.
async fn touch(state: &AppState, hash: &str) {
    if state.lookups.touched.get(hash).is_some() {
        return;
    }
    match state.store.touch_policy(hash).await {
        Ok(()) => state.lookups.touched.put(hash.to_string(), ()),
        Err(e) => tracing::warn!(policy = hash, "cannot record the policy version in use: {e}"),
    }
}

/// A version read from the store, parsed and cached.
fn remember_version(state: &AppState, stored: &StoredPolicy) -> Result<Policy, ApiError> {
    if let Some(policy) = state.lookups.versions.get(&stored.hash) {
        return Ok(policy);
    }
    let policy = policy_of(stored)?;
    state.lookups.versions.put(stored.hash.clone(), policy.clone());
    Ok(policy)
}

fn summary(p: &PolicySummary) -> Value {
    json!({"id": p.hash, "hash": p.hash, "name": p.name, "active": p.active, "created_at": p.created_at,
           "version": p.version.clone().unwrap_or(Value::Null)})
}

fn full(p: &StoredPolicy) -> Value {
    let mut value = summary(&p.summary());
    value["body"] = json!(p.body);
    value["meta"] = p.meta.get("meta").cloned().unwrap_or(Value::Null);
    value["source"] = p.meta.get("source").cloned().unwrap_or(Value::Null);
    value
}

/// The name an inline policy that names itself nowhere is stored under.
const INLINE_NAME: &str = "inline";

/// Whether `stored` is an unpinned version named only by the inline fallback whose stored source, given the name
/// it is now published with, reads exactly as `policy`: its name was never chosen by anyone, so publishing the
/// body may give it one, while any other difference in front matter is still a conflict.
fn named_only_inline(stored: &StoredPolicy, name: Option<&str>, policy: &Policy) -> bool {
    let fallback = stored.meta.get("fallback_name").and_then(Value::as_str);
    if stored.active || stored.name != INLINE_NAME || fallback != Some(INLINE_NAME) {
        return false;
    }
    let source = stored.meta.get("source").and_then(Value::as_str).unwrap_or(&stored.body);
    let renamed = Policy::parse_with_fallback_name(source, name.or(Some(policy.meta.name.as_str())));
    renamed.is_ok_and(|renamed| renamed.meta == policy.meta)
}

/// `POST /v1/policies`: markdown as the body, or JSON `{"text": "…", "name": "…"}`. 201 for a new version,
/// 200 when that exact body is already stored with the same front matter, 409 when with other front matter.
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require("policies:write")?;
    let body = body.map_err(|e| {
        if crate::error::body_timed_out(&e) {
            ApiError::RequestTimeout(e.body_text())
        } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(e.body_text())
        } else {
            ApiError::bad("invalid_body", e.body_text())
        }
    })?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    let (text, name) = if is_json {
        let value: Value = serde_json::from_slice(&body).map_err(|e| ApiError::bad("invalid_json", e.to_string()))?;
        let text = value
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad("invalid_policy", "expected {\"text\": \"<policy markdown>\"}"))?
            .to_string();
        (text, value.get("name").and_then(Value::as_str).map(str::to_string))
    } else {
        let text = String::from_utf8(body.to_vec())
            .map_err(|_| ApiError::bad("invalid_policy", "the policy is not valid UTF-8"))?;
        (text, None)
    };
    let policy =
        parse_sent_policy(&state, &text, name.as_deref()).map_err(|why| ApiError::bad("invalid_policy", why))?;
    // Stored unpinned: the name is pinned only once the stored front matter is known to be this caller's. A
    // copy of the body stored earlier with other front matter (an inline policy) must not get the name on the way
    // to the 409.
    let (mut stored, created) = store_policy(&state.store, &policy, &text, name.as_deref(), false).await?;
    if !created && named_only_inline(&stored, name.as_deref(), &policy) {
        // Tried inline first, it was stored under the fallback name; publishing it names it.
        let meta = stored_meta(&policy, &text, name.as_deref());
        if let Some(renamed) =
            state.store.rename_unpinned_policy(&stored.hash, INLINE_NAME, &policy.meta.name, &meta).await?
        {
            state.lookups.versions.forget(&renamed.hash);
            state.lookups.inline.forget(&renamed.hash);
            stored = renamed;
        }
    }
    if !created && policy_of(&stored)?.meta != policy.meta {
        // The version is the body's hash, so this body is stored already, with other front matter: answering
        // 200 would quietly drop what the caller just changed (a name, `high_risk`, triage settings).
        return Err(ApiError::Conflict(format!(
            "this body is already stored as version {} (policy {:?}) with different front matter; a version is \
             the hash of its body, so change the body to store these settings as a new version",
            stored.hash, stored.name
        )));
    }
    if !stored.active
        && let Some(pinned) = state.store.pin_first_version(&stored.hash, &stored.name, &stored.meta).await?
    {
        stored = pinned;
    }
    if stored.active {
        safeguard_core::reserve_policy_label(&stored.name);
    }
    state.lookups.active.forget(&stored.name);
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(full(&stored))).into_response())
}

/// Whether the caller sees versions that are not active: drafts, and the inline policies other clients sent
/// (their text is theirs). A key that only classifies sees the versions names resolve to, and any version whose
/// hash it already knows.
fn sees_every_version(caller: &Caller) -> bool {
    ["policies:write", "review", "audit"].iter().any(|scope| caller.has(scope))
}

#[derive(Deserialize)]
pub(crate) struct ListQuery {
    /// Only this name's versions.
    name: Option<String>,
    #[serde(default = "default_page")]
    limit: i64,
    after: Option<String>,
}

fn default_page() -> i64 {
    200
}

/// One page of summaries, with the cursor of the next page (`next_after`) while there may be more.
async fn listing_reply(state: &AppState, listing: PolicyListing<'_>) -> Result<Value, ApiError> {
    let listing = PolicyListing { limit: listing.limit.clamp(1, MAX_POLICY_PAGE), ..listing };
    let page = state.store.policy_summaries(&listing).await?;
    let next = page.last().filter(|_| page.len() as i64 == listing.limit).map(|last| last.hash.clone());
    Ok(json!({"policies": page.iter().map(summary).collect::<Vec<_>>(), "next_after": next}))
}

pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require("classify")?;
    let listing = PolicyListing {
        name: query.name.as_deref(),
        only_active: !sees_every_version(&caller),
        limit: query.limit,
        after: query.after.as_deref(),
    };
    Ok(Json(listing_reply(&state, listing).await?))
}

async fn find(state: &AppState, id: &str) -> Result<StoredPolicy, ApiError> {
    let found =
        if looks_like_hash(id) { state.store.get_policy(id).await? } else { state.store.active_policy(id).await? };
    found.ok_or_else(|| ApiError::NotFound(format!("no policy {id:?}")))
}

/// A hash gives that version; a name gives its active version and the list of all its versions.
pub(crate) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require("classify")?;
    let policy = find(&state, &id).await?;
    let mut value = full(&policy);
    if !looks_like_hash(&id) {
        // The newest page of them; past it, `GET /v1/policies?name=NAME&after=versions_next_after`.
        let listing = PolicyListing {
            name: Some(&policy.name),
            only_active: !sees_every_version(&caller),
            limit: MAX_POLICY_PAGE,
            after: None,
        };
        let page = listing_reply(&state, listing).await?;
        value["versions"] = page["policies"].clone();
        value["versions_next_after"] = page["next_after"].clone();
    }
    Ok(Json(value))
}

/// How long a diff may search for the shortest edit before it settles for a longer one: two large, unrelated
/// bodies would otherwise hold a thread for as long as the quadratic search takes.
const DIFF_TIMEOUT: Duration = Duration::from_secs(1);

/// Unified diff of two versions' bodies (names resolve to their active versions).
pub(crate) async fn diff(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, other)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    caller.require("classify")?;
    let from = find(&state, &id).await?;
    let to = find(&state, &other).await?;
    // Diffing is CPU work of up to DIFF_TIMEOUT: off the runtime's workers, which serve every other request.
    let text = tokio::task::spawn_blocking(move || {
        similar::TextDiff::configure()
            .timeout(DIFF_TIMEOUT)
            .diff_lines(&from.body, &to.body)
            .unified_diff()
            .context_radius(3)
            .header(&from.hash, &to.hash)
            .to_string()
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("the diff failed: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "text/x-diff; charset=utf-8")], text).into_response())
}

pub(crate) async fn activate(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    crate::error::ApiJson(body): crate::error::ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    caller.require("policies:write")?;
    let hash = body
        .get("hash")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad("invalid_request", "expected {\"hash\": \"sha256:…\"}"))?;
    ApiError::refuse_nul("hash", hash)?;
    let activated = state.store.activate_policy(&name, hash).await;
    state.lookups.active.forget(&name);
    match activated {
        Ok(policy) => {
            safeguard_core::reserve_policy_label(&policy.name);
            Ok(Json(full(&policy)))
        }
        Err(StoreError::PolicyNotFound(h)) => Err(ApiError::NotFound(format!("no policy version {h}"))),
        Err(e @ StoreError::PolicyNameMismatch { .. }) => Err(ApiError::bad("policy_name_mismatch", e.to_string())),
        Err(e) => Err(e.into()),
    }
}
