//! The OpenAPI 3.1 description of the API, written by hand (the handlers take JSON values, which derive
//! macros cannot describe usefully). A test checks that every routed path is documented.

use axum::Json;
use serde_json::{Value, json};

fn op(summary: &str, scope: Option<&str>, request: Option<Value>, ok: &str, ok_schema: Value) -> Value {
    let mut operation = json!({
        "summary": summary,
        "responses": {
            ok: {"description": "success", "content": {"application/json": {"schema": ok_schema}}},
            "400": {"$ref": "#/components/responses/Error"},
            "401": {"$ref": "#/components/responses/Error"},
            "403": {"$ref": "#/components/responses/Error"},
            "429": {"$ref": "#/components/responses/Error"},
        }
    });
    if let Some(scope) = scope {
        operation["security"] = json!([{"bearer": [scope]}]);
        operation["description"] = json!(format!("Requires the `{scope}` scope (or `admin`)."));
    } else {
        operation["security"] = json!([]);
    }
    if let Some(schema) = request {
        operation["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema}}});
    }
    operation
}

/// An operation whose success reply is text of `media` type, not JSON.
fn text_reply(mut operation: Value, ok: &str, media: &str) -> Value {
    operation["responses"][ok]["content"] = json!({media: {"schema": {"type": "string"}}});
    operation
}

/// An operation that any one of `scopes` may call.
fn any_scope(mut operation: Value, scopes: &[&str]) -> Value {
    operation["security"] = Value::Array(scopes.iter().map(|scope| json!({"bearer": [scope]})).collect());
    let named: Vec<String> = scopes.iter().map(|scope| format!("`{scope}`")).collect();
    operation["description"] = json!(format!("Requires the {} scope (or `admin`).", named.join(" or ")));
    operation
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

pub(crate) fn document() -> Value {
    let decision = json!({"$ref": "#/components/schemas/Decision"});
    let classify = json!({"$ref": "#/components/schemas/ClassifyRequest"});
    let any = json!({"type": "object"});
    let mut policy_list = op(
        "List policy versions without their bodies, by name and newest first, a page at a time (pass a reply's \
         `next_after` as `after` for the next page; null when there are no more): the active ones, and with the policies:write, review or audit \
         scope also the others (drafts, inline policies clients sent)",
        Some("classify"),
        None,
        "200",
        any.clone(),
    );
    policy_list["parameters"] = json!([
        {"name": "name", "in": "query", "schema": {"type": "string"}, "description": "only this name's versions"},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 200}},
        {"name": "after", "in": "query", "schema": {"type": "string"}, "description": "a previous page's next_after"}]);
    json!({
        "openapi": "3.1.0",
        "info": {"title": "safeguard", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Policy-following moderation with gpt-oss-safeguard. Failures are needs_review, never allow."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
                "PolicyRef": {"oneOf": [
                    {"type": "string", "description": "a policy name (its active version) or a version id \"sha256:…\""},
                    {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}, "name": {"type": "string"}}}]},
                "ClassifyRequest": {"type": "object", "required": ["policies"],
                    "description": "A field the route does not read is refused (400 unknown_field): route is /v1/classify's, webhook_url /v1/jobs'. Content whose prompt, with the completion cap of the most effort its route may reach, does not fit the model's context is refused (400 content_too_long, saying how many content tokens fit)",
                    "properties": {
                    "text": {"type": "string"}, "prompt": {"type": "string"}, "response": {"type": "string"},
                    "messages": {"type": "array", "items": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}},
                    "content": {"type": "object", "required": ["kind"],
                        "description": "the content in its tagged form instead of text/prompt/response/messages (not with them): {\"kind\": \"text\", \"text\"}, {\"kind\": \"prompt\", \"prompt\"}, {\"kind\": \"response\", \"response\", \"prompt\"?}, {\"kind\": \"conversation\", \"messages\"}",
                        "properties": {"kind": {"enum": ["text", "prompt", "response", "conversation"]}}},
                    "policies": {"type": "array", "items": {"$ref": "#/components/schemas/PolicyRef"}},
                    "effort": {"enum": ["low", "medium", "high"],
                        "description": "/v1/classify: pins direct reasoning at this effort (no cascade)"},
                    "reasoning_effort": {"enum": ["low", "medium", "high"], "description": "the same as `effort` (the OpenAI name)"},
                    "route": {"enum": ["cascade", "direct"],
                        "description": "/v1/classify only. cascade: triage, then reasoning at the first effort (--first-effort, low), then the escalation effort (high), then a person; direct: one reasoning step at `effort` (the server's --effort when absent). Without `route`, a request with an effort or combined mode is direct, and one without takes the server's --classify-route (cascade unless it is started with --classify-route direct). cascade with an explicit effort or combined mode is a 400."},
                    "mode": {"enum": ["separate", "combined"], "description": "combined is direct reasoning only"},
                    "max_tokens": {"type": "integer", "minimum": 1, "description": "completion tokens per reasoning step, at most the server's limit"},
                    "return_reasoning": {"type": "boolean", "description": "needs the audit scope"},
                    "webhook_url": {"type": "string", "description": "jobs only"}}},
                "Verdict": {"type": "object", "properties": {
                    "policy": {"type": "string"}, "policy_hash": {"type": "string"}, "violation": {"type": ["boolean", "null"]},
                    "label": {"type": ["string", "null"]}, "rule_ids": {"type": "array", "items": {"type": "string"}},
                    "outcome": {"enum": ["allow", "violation", "needs_review"]}, "flags": {"type": "array"},
                    "engine_confidence": {"type": ["number", "null"]},
                    "stage": {"$ref": "#/components/schemas/Stage", "description": "cascade only: the stage that settled this policy"},
                    "escalations": {"type": "array", "description": "cascade only: why it left each stage it passed, in order"},
                    "triage": {"type": ["object", "null"], "description": "cascade only: triage's band, probability and rule evidence"},
                    "model_outcome": {"enum": ["allow", "violation", "needs_review"], "description": "cascade only: the model's own outcome where the cascade's differs (appeal, end of the line)"}}},
                "Decision": {"type": "object", "properties": {
                    "decision_id": {"type": "string"}, "outcome": {"enum": ["allow", "violation", "needs_review"]},
                    "verdicts": {"type": "array", "items": {"$ref": "#/components/schemas/Verdict"}},
                    "usage": {"type": "object", "description": "summed over all reasoning steps"},
                    "timings": {"type": "object"}, "model": {"type": "string"},
                    "effort": {"type": "string", "description": "cascade: the highest effort any reasoning step used, \"none\" when triage settled every policy"},
                    "failure_reason": {"type": "string"},
                    "reasoning": {"type": "array", "items": {"type": "string"}},
                    "route": {"enum": ["cascade", "direct"]},
                    "decided_by": {"$ref": "#/components/schemas/Stage"},
                    "stages": {"type": "array", "description": "cascade only: the stages run, in order",
                        "items": {"type": "object", "properties": {"stage": {"$ref": "#/components/schemas/Stage"},
                            "policies": {"type": "array", "items": {"type": "string"}}, "elapsed_ms": {"type": "number"}}}}}},
                "Stage": {"enum": ["triage", "reasoning_low", "reasoning_medium", "reasoning_high", "human_review"]},
                "JobAccepted": {"type": "object", "properties": {"id": {"type": "string"},
                    "status": {"enum": ["pending", "running", "done", "failed"]}, "attempts": {"type": "integer"},
                    "decision_id": {"type": ["string", "null"]}, "error": {"type": ["string", "null"]},
                    "created_at": {"type": "integer", "description": "milliseconds since the Unix epoch"},
                    "updated_at": {"type": "integer"}}},
                "Job": {"allOf": [{"$ref": "#/components/schemas/JobAccepted"}, {"type": "object", "properties": {
                    "outcome": {"enum": ["pending", "allow", "violation", "needs_review"], "description": "pending until decided; needs_review for a job given up on"},
                    "decision": {"type": "object", "description": "the stored decision, once decided"},
                    "review": {"type": "object", "description": "a person's review of the item, when it went to one: id, kind, status (pending, decided, superseded), outcome, rule_id, policy_hash, due_at, decided_at (the job's webhook hears job.reviewed when it is decided)"},
                    "appeal": {"type": "object", "description": "the review of an appeal of the item, if one was made, in the same shape"}}}]}
            }
        },
        "paths": {
            "/healthz": {"get": text_reply(op("Liveness: `ok`", None, None, "200", Value::Null), "200", "text/plain")},
            "/readyz": {"get": op("Readiness: database reachable; 503 with the reasons in `why` when not. With --nats the body reports the NATS worker (`nats.serving`, `nats.down_for_ms`), and with --nats-ready-grace-secs a worker down for longer fails readiness too. With --backend it reports how many reasoning servers are usable (answering their last probe, circuit breaker not open) as `backends.usable` of `backends.total`, and since when none has been (`backends.down_for_ms`); /metrics has each endpoint. With --backend-ready-grace-secs none usable for longer fails readiness too. The body also names the served model", None, None, "200", any.clone())},
            "/metrics": {"get": text_reply(op("Prometheus metrics (open, or with --metrics-require-key a key with the metrics scope), among them the cascade's safeguard_pipeline_skip_rate and safeguard_pipeline_escalation_rate{stage}, safeguard_review_agreement_rate (reviews of items the model left undecided are apart, in safeguard_reviews_decided{model=\"undecided\"}; audits of triage are apart, in safeguard_triage_audits_decided{result}), per item safeguard_reasoning_tokens_per_item, safeguard_cost_per_item, safeguard_latency_per_item_seconds, safeguard_metrics_store_errors_total (figures read from the database at the scrape are stale while it grows), with --retain-days safeguard_pruned_rows_total{table} and safeguard_prune_errors_total, with --backend safeguard_backends_usable and per endpoint safeguard_backend_usable{endpoint} and safeguard_backend_in_flight{endpoint}, per policy and effort safeguard_prompts_total, safeguard_prompt_tokens_total, safeguard_prompt_latency_seconds, safeguard_prompt_cost_estimate", None, None, "200", Value::Null), "200", "text/plain")},
            "/openapi.json": {"get": op("This document", None, None, "200", any.clone())},
            "/v1/policies": {
                "post": op("Store a policy version (markdown body, or JSON {text}); 201 new, 200 existing, 409 the same body with other front matter", Some("policies:write"),
                           Some(json!({"type": "object", "properties": {"text": {"type": "string"}, "name": {"type": "string"}}})), "201", any.clone()),
                "get": policy_list},
            "/v1/policies/{id}": {"parameters": [path_param("id")],
                "get": op("A version by hash, or a name's active version with its versions (the newest 1000, without bodies; `versions_next_after` continues them through GET /v1/policies?name=&after=)", Some("classify"), None, "200", any.clone())},
            "/v1/policies/{id}/diff/{other}": {"parameters": [path_param("id"), path_param("other")],
                "get": text_reply(op("Unified diff between two versions", Some("classify"), None, "200", Value::Null), "200", "text/x-diff")},
            "/v1/policies/{name}/activate": {"parameters": [path_param("name")],
                "post": op("Point a name at a stored version", Some("policies:write"),
                           Some(json!({"type": "object", "required": ["hash"], "properties": {"hash": {"type": "string"}}})), "200", any.clone())},
            "/v1/classify": {"post": op("Classify content under policies; the decision is stored (one record per item). Without an effort it goes through the cascade (triage → low → high → a person; 429 with Retry-After when the reasoning budget is spent), unless the server runs with --classify-route direct; with an effort or route=direct it reasons once (at the server's --effort when none is given). The Server-Timing header has policy, cascade, store through the cascade and policy, reason, store on the direct route. Every route that reasons (classify, batch, moderate, moderations, chat, replay, appeal) answers 429 with Retry-After while the reasoning budget is spent; jobs wait queued instead", Some("classify"), Some(classify.clone()), "200", decision.clone())},
            "/v1/moderate": {"post": op("The cascade's own view: per-policy routes, stages and every reasoning step, stored as one decision per item (source cascade:<stage that settled it>, every stage on the record); 429 with Retry-After over the reasoning budget", Some("classify"),
                Some(json!({"type": "object", "required": ["policies"], "additionalProperties": false,
                    "description": "the content fields of ClassifyRequest (text, prompt, response, messages or content), policies, max_tokens, return_reasoning and appeal; the cascade chooses its own efforts, so effort, mode and route are refused (400 unknown_field)",
                    "properties": {
                        "text": {"type": "string"}, "prompt": {"type": "string"}, "response": {"type": "string"},
                        "messages": {"type": "array"}, "content": {"type": "object"},
                        "policies": {"type": "array", "items": {"$ref": "#/components/schemas/PolicyRef"}},
                        "max_tokens": {"type": "integer", "minimum": 1}, "return_reasoning": {"type": "boolean"},
                        "appeal": {"type": "boolean", "description": "judge the item as an appeal (high effort, then a person, first in the queue); needs the review scope, since it names no decision of the caller's: a client appeals its own with /v1/decisions/{id}/appeal"}}})),
                "200", json!({"type": "object", "properties": {"outcome": {"enum": ["allow", "violation", "needs_review"]},
                    "decided_by": {"$ref": "#/components/schemas/Stage"}, "policies": {"type": "array"}, "stages": {"type": "array"},
                    "reasoning": {"type": "array", "items": decision.clone()}, "decision_id": {"type": "string"}}}))},
            "/v1/classify/batch": {"post": op("Classify many items together (direct reasoning, one batch)", Some("classify"),
                Some(json!({"type": "object", "required": ["items", "policies"], "additionalProperties": false,
                    "description": "the settings of ClassifyRequest for every item; an item with a field other than the content fields, or one too long for the model's context, is answered with its own error",
                    "properties": {
                        "items": {"type": "array", "items": {"type": "object", "description": "text, prompt, response, messages or content, as in ClassifyRequest"}},
                        "policies": {"type": "array", "items": {"$ref": "#/components/schemas/PolicyRef"}},
                        "effort": {"enum": ["low", "medium", "high"]}, "reasoning_effort": {"enum": ["low", "medium", "high"]},
                        "mode": {"enum": ["separate", "combined"]}, "max_tokens": {"type": "integer", "minimum": 1},
                        "return_reasoning": {"type": "boolean"}}})),
                "200", json!({"type": "object", "properties": {"results": {"type": "array", "items": decision.clone()}}}))},
            "/v1/jobs": {"post": {
                "summary": "Queue a classification; persisted before the 202. Header Idempotency-Key makes retries safe; a key is unique among the jobs of the client (API key name) that submits it.",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string"}}],
                "security": [{"bearer": ["classify"]}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": classify}}},
                "responses": {"202": {"description": "accepted", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobAccepted"}}}},
                              "200": {"description": "same Idempotency-Key: the existing job"},
                              "409": {"$ref": "#/components/responses/Error"}}}},
            "/v1/jobs/{id}": {"parameters": [path_param("id")],
                "get": op("A job; outcome is pending until decided. Only the client (API key name) that submitted it reads it, or a classify key that also has the review scope; for others it is 404", Some("classify"), None, "200", json!({"$ref": "#/components/schemas/Job"}))},
            "/v1/decisions": {"get": {
                "summary": "List stored decisions, newest first", "security": [{"bearer": ["review"]}, {"bearer": ["audit"]}],
                "description": "Requires the `review` or `audit` scope (or `admin`).",
                "parameters": [
                    {"name": "outcome", "in": "query", "schema": {"enum": ["allow", "violation", "needs_review"]}},
                    {"name": "policy", "in": "query", "schema": {"type": "string"}},
                    {"name": "since", "in": "query", "schema": {"type": "integer", "description": "unix ms"}},
                    {"name": "before", "in": "query", "schema": {"type": "integer", "description": "unix ms"}},
                    {"name": "before_id", "in": "query", "schema": {"type": "string", "description": "with before: the last decision seen; pass a reply's next_page to read the next one without skipping decisions of the same millisecond"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 1000}}],
                "responses": {"200": {"description": "decisions, newest first, and next_page ({before, before_id}, null when this page was not full)"}}}},
            "/v1/decisions/{id}": {"parameters": [path_param("id")],
                "get": any_scope(op("One decision; reasoning only with the audit scope", None, None, "200", any.clone()), &["review", "audit"])},
            "/v1/decisions/{id}/replay": {"parameters": [path_param("id")],
                "post": op("Re-run with the same policy versions and effort; reports whether the verdict changed. 409 when the decision cannot be re-run (its content is unreadable, or a policy version is gone or no longer parses)", Some("audit"), None, "200", any.clone())},
            "/v1/moderations": {"post": op("OpenAI-compatible moderation over the configured policy set; 503 naming the policies when any of the set has no active version (never judged against part of it)", Some("classify"),
                Some(json!({"type": "object", "required": ["input"], "properties": {"input": {"oneOf": [{"type": "string"}, {"type": "array"}]}, "model": {"type": "string"}}})),
                "200", any.clone())},
            "/v1/chat/completions": {"post": op("OpenAI-compatible chat completions for the served model (the system and developer messages are the policy, and one is required; reasoning in message.reasoning, for keys with the audit scope; content parts other than text are refused)", Some("classify"),
                Some(json!({"type": "object", "required": ["messages"], "properties": {"messages": {"type": "array"},
                    "reasoning_effort": {"enum": ["low", "medium", "high"]}, "stream": {"type": "boolean"}, "max_tokens": {"type": "integer"}}})),
                "200", any.clone())},
            "/v1/models": {"get": op("The served model", Some("classify"), None, "200", any.clone())},
            "/v1/webhooks/secret": {"get": op("The secret this client's job webhooks are signed with (X-Safeguard-Signature): its own, derived from the server's by the key's name, so no client can sign deliveries another's receiver would accept. Jobs of a keyless server have a secret of their own; the server's own secret signs nothing", Some("classify"), None, "200", any.clone())},
            "/v1/decisions/{id}/appeal": {"parameters": [path_param("id")],
                "post": op("Appeal a stored decision: the item is reasoned about again at high effort under the same policy versions, then queued for a person (kind appeal) whatever the model says, and the decision's reviews still pending are superseded (the appeal is the one a person answers); 429 with Retry-After over the reasoning budget. Only the client (API key name) that submitted the decision may appeal it, or a classify key that also has the review scope (decisions from the bus, a keyless server or before this was recorded have no owner); for others it is 404. A decision is appealed once: appealing it again, or appealing the appeal's own decision, answers with the appeal made before (repeated: true)", Some("classify"),
                    Some(json!({"type": "object", "properties": {"reason": {"type": "string", "description": "why the decision is appealed, shown to the reviewer"}}})),
                    "200", any.clone())},
            "/v1/reviews": {"get": {
                "summary": "The review queue: pending reviews past their SLA first (longest overdue first), then by priority, then due time; decided and superseded reviews latest first (decided_at, then id), a page at a time (next_page: the before and before_id of the next page, null on the last); with the queue's stats (pending, overdue, decided, overrides, agreement_rate; audits of triage apart: audits_decided, audits_overturned)",
                "security": [{"bearer": ["review"]}],
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"enum": ["pending", "decided", "superseded"], "default": "pending"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 50, "maximum": 1000}},
                    {"name": "before", "in": "query", "schema": {"type": "integer"}, "description": "decided and superseded only: unix ms, from next_page"},
                    {"name": "before_id", "in": "query", "schema": {"type": "string"}, "description": "with before, from next_page"}],
                "responses": {"200": {"description": "reviews and stats"}}}},
            "/v1/reviews/{id}": {"parameters": [path_param("id")],
                "get": op("One review with its decision: content, verdicts, reasoning and the policy text the cited rules link to (for a pending audit or sample, only the policy it asks about, the review's policy_hash). For the review page, decision.judged_text is the part of the content triage scored (null for content this build cannot read), and each cascade verdict adds escalation_reasons (its escalations in words, in order; one that no longer parses shows its kind) and, where triage matched rules, triage_highlights ([{start, end, rule, action, kind}] with start and end in UTF-16 code units of judged_text, as JavaScript indexes strings; spans that do not fall on its characters are left out)", Some("review"), None, "200", any.clone())},
            "/v1/reviews/{id}/claim": {"parameters": [path_param("id")],
                "post": op("Work a pending review for ten minutes: other reviewers are refused it (409, naming the key that holds it and until when), and refused deciding it, until the claim lapses; claiming it again renews it. The review page claims the item a reviewer stays on (renewing it while it is on screen) and moves past items others hold. Queue rows carry claimed_by and claimed_until; the queue's reply names the caller's key id (you)", Some("review"), None, "200", any.clone())},
            "/v1/reviews/{id}/decide": {"parameters": [path_param("id")],
                "post": op("A person's decision: an outcome, a rationale and the rule it applies are required; an override of the model is stored with the reviewer. An item that came in over NATS is announced on its decision subject", Some("review"),
                    Some(json!({"type": "object", "required": ["outcome", "rationale", "rule_id"], "properties": {
                        "outcome": {"enum": ["allow", "violation"]}, "rationale": {"type": "string"},
                        "rule_id": {"type": "string", "description": "a rule id of the item's policies, on the outcome's side; of the policy asked about (the review's policy_hash) for a pending audit or sample"},
                        "reviewer": {"type": "string"}}})),
                    "200", any.clone())},
            "/review": {"get": op("The review page (HTML): the queue, each item with its content, verdicts and reasoning, cited rules linked to the policy text; keyboard shortcuts. Signs in with an API key of scope review", None, None, "200", json!({"type": "string"}))},
            "/v1/stats/prompts": {"get": any_scope(op("Cost and latency per policy and effort since the server started, from every prompt any path sent to the model (chat completions as policy \"(chat)\"): prompts, failures, tokens (uncached prompt, cached prompt, completion), cost estimate (--cost-per-1k-tokens), latency mean/p50/p95/max (p50 and p95 at the /metrics bucket bounds). The same figures are on /metrics", None, None, "200", any), &["review", "audit"])},
        }
    })
}

pub(crate) async fn spec() -> Json<Value> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read from the router's own source, so a route added without its description fails here.
    #[test]
    fn every_routed_path_is_in_the_spec_and_nothing_else() {
        let routed: Vec<&str> =
            include_str!("lib.rs").split(".route(\"").skip(1).filter_map(|rest| rest.split('"').next()).collect();
        assert!(routed.len() > 20, "the router's paths were not found: {routed:?}");
        let doc = document();
        let documented = doc["paths"].as_object().unwrap();
        for path in &routed {
            assert!(documented.contains_key(*path), "{path} is routed but not described");
        }
        for path in documented.keys() {
            assert!(routed.contains(&path.as_str()), "{path} is described but not routed");
        }
    }
}
