//! One admin request to one response: which endpoint a path names, the method and access
//! checks, each endpoint's work, and the request counter.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use prometheus::{Encoder, TextEncoder};
use serde::Serialize;

use super::auth::{self, Decision};
use super::json;
use super::query;
use crate::route::{Reloaded, RouteError, Trigger};
use crate::session::Shared;

/// Prometheus text exposition format 0.0.4, with the charset spelled out.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// Everything a request handler needs.
pub struct Ctx {
    pub shared: Arc<Shared>,
    /// The admin server's bound address, for the loopback-only rule.
    pub listener: SocketAddr,
}

/// The endpoints, as the bounded `endpoint` label of `admin_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Metrics,
    Healthz,
    Readyz,
    Reload,
    Route,
    Kick,
    Other,
}

impl Endpoint {
    fn of(path: &str) -> Self {
        match path {
            "/metrics" => Endpoint::Metrics,
            "/healthz" => Endpoint::Healthz,
            "/readyz" => Endpoint::Readyz,
            "/admin/reload" => Endpoint::Reload,
            "/admin/route" => Endpoint::Route,
            "/admin/kick" => Endpoint::Kick,
            _ => Endpoint::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Endpoint::Metrics => "metrics",
            Endpoint::Healthz => "healthz",
            Endpoint::Readyz => "readyz",
            Endpoint::Reload => "reload",
            Endpoint::Route => "route",
            Endpoint::Kick => "kick",
            Endpoint::Other => "other",
        }
    }

    /// The one method the endpoint answers; None for an unknown path.
    fn method(self) -> Option<&'static str> {
        match self {
            Endpoint::Metrics | Endpoint::Healthz | Endpoint::Readyz | Endpoint::Route => {
                Some("GET")
            }
            // They change state: a GET from a link or a crawler must not reload or kick.
            Endpoint::Reload | Endpoint::Kick => Some("POST"),
            Endpoint::Other => None,
        }
    }
}

/// Whether `path` is under the guarded `/admin` tree (unknown paths there included, so an
/// unauthenticated caller cannot probe which admin endpoints exist).
fn guarded(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

/// Answers one request and counts it. The request body is never read: no endpoint takes
/// one, and hyper closes a connection whose request body was left unread.
pub async fn handle(req: Request<Incoming>, ctx: &Ctx) -> Response<Full<Bytes>> {
    let endpoint = Endpoint::of(req.uri().path());
    let response = respond(endpoint, &req, ctx).await;
    ctx.shared
        .metrics
        .admin_requests
        .with_label_values(&[endpoint.label(), response.status().as_str()])
        .inc();
    response
}

async fn respond(endpoint: Endpoint, req: &Request<Incoming>, ctx: &Ctx) -> Response<Full<Bytes>> {
    let admin = guarded(req.uri().path());
    if admin {
        let token = ctx.shared.admin_token.as_ref().map(|t| t.as_str());
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match auth::decide(ctx.listener, token, header) {
            Decision::Allowed => {}
            Decision::Unauthorized => {
                let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
            Decision::Forbidden => {
                return error(
                    StatusCode::FORBIDDEN,
                    "the admin server listens beyond loopback: set admin.token \
                     (or admin.token_file) to use /admin/*",
                );
            }
        }
    }
    let Some(method) = endpoint.method() else {
        return if admin {
            error(StatusCode::NOT_FOUND, "not found")
        } else {
            text(StatusCode::NOT_FOUND, "not found\n")
        };
    };
    if req.method().as_str() != method {
        let mut r = if admin {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        } else {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        };
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(method));
        return r;
    }
    let shared = &ctx.shared;
    match endpoint {
        Endpoint::Metrics => metrics(shared),
        Endpoint::Healthz => text(StatusCode::OK, "ok\n"),
        Endpoint::Readyz => readyz(shared),
        Endpoint::Reload => reload(shared).await,
        Endpoint::Route => route(shared, req.uri().query()),
        Endpoint::Kick => kick(shared, req.uri().query()),
        Endpoint::Other => error(StatusCode::NOT_FOUND, "not found"),
    }
}

fn metrics(shared: &Shared) -> Response<Full<Bytes>> {
    let families = shared.registry.gather();
    let mut body = Vec::new();
    match TextEncoder::new().encode(&families, &mut body) {
        Ok(()) => respond_with(StatusCode::OK, METRICS_CONTENT_TYPE, body),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n")
        }
    }
}

fn readyz(shared: &Shared) -> Response<Full<Bytes>> {
    let lifecycle = &shared.lifecycle;
    if lifecycle.is_ready() {
        text(StatusCode::OK, "ready\n")
    } else if lifecycle.is_draining() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn reload(shared: &Arc<Shared>) -> Response<Full<Bytes>> {
    let shared = Arc::clone(shared);
    // Reading the file and loading CA certificates is blocking I/O.
    let result =
        tokio::task::spawn_blocking(move || crate::reload::reload_routes(&shared, Trigger::Admin))
            .await;
    match result {
        Ok(Ok(Reloaded::Swapped(generation) | Reloaded::Unchanged(generation))) => {
            json_ok(&json::Generation { generation })
        }
        // reload_routes has logged and counted the failure; the old table stays.
        Ok(Err(e @ RouteError::Invalid(_))) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string())
        }
        Ok(Err(e @ RouteError::Read { .. })) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
        }
        Err(e) => {
            tracing::error!(error = %e, "routing table reload task failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "reload failed")
        }
    }
}

fn route(shared: &Shared, query: Option<&str>) -> Response<Full<Bytes>> {
    let user = match query::param(query, "user") {
        Ok(u) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let table = shared.routes.table();
    let generation = shared.routes.generation();
    match table.lookup(&user) {
        Some(route) => json_ok(&json::RouteView::new(&user, generation, &route)),
        None => error(StatusCode::NOT_FOUND, "no route for this user"),
    }
}

fn kick(shared: &Shared, query: Option<&str>) -> Response<Full<Bytes>> {
    let user = match query::param(query, "user") {
        Ok(u) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let sessions = shared.lifecycle.kick(&user);
    tracing::info!(user = %user, sessions, "sessions kicked by the administrator");
    json_ok(&json::Kicked { sessions })
}

fn json_ok<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => respond_with(StatusCode::OK, JSON, body),
        Err(e) => {
            tracing::error!(error = %e, "encoding a JSON answer failed");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the answer\n",
            )
        }
    }
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    match serde_json::to_vec(&json::Error { error: message }) {
        Ok(body) => respond_with(status, JSON, body),
        Err(_) => text(status, "error\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond_with(status, TEXT, body)
}

fn respond_with(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_a_fixed_label_set() {
        for (path, label) in [
            ("/metrics", "metrics"),
            ("/healthz", "healthz"),
            ("/readyz", "readyz"),
            ("/admin/reload", "reload"),
            ("/admin/route", "route"),
            ("/admin/kick", "kick"),
            ("/admin/kick/", "other"),
            ("/metrics/alice", "other"),
            ("/", "other"),
        ] {
            assert_eq!(Endpoint::of(path).label(), label, "{path}");
        }
        assert!(guarded("/admin"));
        assert!(guarded("/admin/anything"));
        assert!(!guarded("/administrator"));
        assert!(!guarded("/metrics"));
    }
}
