//! The REST routes, derived from the `google.api.http` options of the methods in a
//! descriptor set (for NanoBox, `nanobox_proto::FILE_DESCRIPTOR_SET`): one route per rule
//! and per `additional_bindings` entry, checked against the request and response messages
//! when the gateway starts, so a rule naming a missing field fails the start rather than a
//! request.

use std::borrow::Cow;

use axum::http::Method;
use nanobox_proto::google::api::{http_rule::Pattern, HttpRule};
use prost_reflect::{
    DescriptorPool, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor, ServiceDescriptor,
};

use crate::error::RouteError;
use crate::template::{Bindings, PathTemplate};

/// The full name of the method option extension carrying the HTTP rule.
const HTTP_EXTENSION: &str = "google.api.http";

/// Where a request message comes from, per the rule's `body`.
#[derive(Debug, Clone)]
pub enum BodyRule {
    /// `body` unset: no request body; fields not in the path come from the query string.
    None,
    /// `body: "*"`: the JSON body is the request message (less the path fields); no query
    /// parameters.
    All,
    /// `body: "field"`: the JSON body is that field; other fields from the query string.
    Field(FieldDescriptor),
}

/// One REST route: an HTTP method and path template bound to a gRPC method.
#[derive(Debug, Clone)]
pub struct Route {
    /// The gRPC method.
    pub method: MethodDescriptor,
    /// The HTTP method.
    pub http_method: Method,
    /// The path template.
    pub template: PathTemplate,
    /// Where the request comes from.
    pub body: BodyRule,
    /// The response field that is the HTTP body (`response_body`), else the whole
    /// response.
    pub response_body: Option<FieldDescriptor>,
    /// Index of the upstream serving the method's service.
    pub upstream: usize,
}

impl Route {
    /// `Service.Method` (`Sandboxes.Create`), for logs and OpenAPI operation ids.
    pub fn rpc_name(&self) -> String {
        format!(
            "{}.{}",
            self.method.parent_service().name(),
            self.method.name()
        )
    }

    /// The gRPC path, `/nanobox.v1.Sandboxes/Create`.
    pub fn grpc_path(&self) -> String {
        format!(
            "/{}/{}",
            self.method.parent_service().full_name(),
            self.method.name()
        )
    }
}

/// The outcome of looking a request up.
#[derive(Debug)]
pub enum RouteMatch<'a> {
    /// A route, with the path variables' values.
    Found(&'a Route, Bindings),
    /// The path matches routes of other HTTP methods only (for `405` and `Allow`).
    MethodNotAllowed(Vec<Method>),
    /// Nothing matches the path.
    NotFound,
}

/// Every route of the exposed services.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Derives the routes of the services that `upstream_for` maps to an upstream index
    /// (services it maps to `None` are not exposed; methods without an HTTP rule never
    /// are).
    pub fn build(
        pool: &DescriptorPool,
        upstream_for: impl Fn(&ServiceDescriptor) -> Option<usize>,
    ) -> Result<Self, RouteError> {
        let extension = pool
            .get_extension_by_name(HTTP_EXTENSION)
            .ok_or(RouteError::NoHttpExtension)?;
        let mut routes: Vec<Route> = Vec::new();
        for service in pool.services() {
            let Some(upstream) = upstream_for(&service) else {
                continue;
            };
            for method in service.methods() {
                let options = method.options();
                if !options.has_extension(&extension) {
                    continue;
                }
                let value = options.get_extension(&extension);
                let rule: HttpRule = match value.as_message() {
                    Some(message) => message.transcode_to().map_err(|source| RouteError::Rule {
                        method: method.full_name().to_owned(),
                        source,
                    })?,
                    None => continue,
                };
                add_rule(&mut routes, &method, &rule, upstream, true)?;
            }
        }
        Ok(Self { routes })
    }

    /// The routes, in descriptor order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Finds the route for a request. Among routes matching the path, the one with the
    /// most literal segments wins (`/templates/warmup` over `/templates/{name}`).
    pub fn find(&self, method: &Method, path: &str) -> RouteMatch<'_> {
        let mut best: Option<(&Route, Bindings)> = None;
        let mut allowed: Vec<Method> = Vec::new();
        for route in &self.routes {
            let Some(bindings) = route.template.matches(path) else {
                continue;
            };
            if route.http_method != *method {
                if !allowed.contains(&route.http_method) {
                    allowed.push(route.http_method.clone());
                }
                continue;
            }
            let better = best
                .as_ref()
                .is_none_or(|(b, _)| route.template.literal_count() > b.template.literal_count());
            if better {
                best = Some((route, bindings));
            }
        }
        match best {
            Some((route, bindings)) => RouteMatch::Found(route, bindings),
            None if !allowed.is_empty() => RouteMatch::MethodNotAllowed(allowed),
            None => RouteMatch::NotFound,
        }
    }
}

/// Adds the routes of one rule (and, at the top level, of its additional bindings).
fn add_rule(
    routes: &mut Vec<Route>,
    method: &MethodDescriptor,
    rule: &HttpRule,
    upstream: usize,
    top: bool,
) -> Result<(), RouteError> {
    let bad = |message: String| RouteError::Binding {
        method: method.full_name().to_owned(),
        message,
    };
    if method.is_client_streaming() {
        return Err(bad(
            "client-streaming methods cannot be served over REST".to_owned()
        ));
    }
    let (http_method, path): (Method, Cow<'_, str>) = match &rule.pattern {
        Some(Pattern::Get(p)) => (Method::GET, p.into()),
        Some(Pattern::Put(p)) => (Method::PUT, p.into()),
        Some(Pattern::Post(p)) => (Method::POST, p.into()),
        Some(Pattern::Delete(p)) => (Method::DELETE, p.into()),
        Some(Pattern::Patch(p)) => (Method::PATCH, p.into()),
        Some(Pattern::Custom(c)) => (
            Method::from_bytes(c.kind.as_bytes())
                .map_err(|_| bad(format!("`{}` is not an HTTP method", c.kind)))?,
            c.path.as_str().into(),
        ),
        None => return Err(bad("the HTTP rule has no method and path".to_owned())),
    };
    let template = PathTemplate::parse(&path)?;
    let input = method.input();
    for variable in template.variables() {
        check_path_field(&input, &variable.field).map_err(bad)?;
    }
    let body = match rule.body.as_str() {
        "" => BodyRule::None,
        "*" => BodyRule::All,
        name => {
            let field = input.get_field_by_name(name).ok_or_else(|| {
                bad(format!(
                    "body field `{name}` is not in {}",
                    input.full_name()
                ))
            })?;
            if template.variables().iter().any(|v| v.field == name) {
                return Err(bad(format!("body field `{name}` is also a path variable")));
            }
            BodyRule::Field(field)
        }
    };
    let response_body = match rule.response_body.as_str() {
        "" => None,
        name => Some(method.output().get_field_by_name(name).ok_or_else(|| {
            bad(format!(
                "response_body field `{name}` is not in {}",
                method.output().full_name()
            ))
        })?),
    };
    if let Some(clash) = routes
        .iter()
        .find(|r| r.http_method == http_method && r.template == template)
    {
        return Err(bad(format!(
            "{http_method} {path} is already bound to {}",
            clash.method.full_name()
        )));
    }
    routes.push(Route {
        method: method.clone(),
        http_method,
        template,
        body,
        response_body,
        upstream,
    });
    if top {
        for extra in &rule.additional_bindings {
            if !extra.additional_bindings.is_empty() {
                return Err(bad(
                    "additional_bindings may not nest further bindings".to_owned()
                ));
            }
            add_rule(routes, method, extra, upstream, false)?;
        }
    }
    Ok(())
}

/// Checks that a path variable names a singular scalar field (through singular messages).
fn check_path_field(message: &MessageDescriptor, path: &str) -> Result<FieldDescriptor, String> {
    let mut current = message.clone();
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let field = current.get_field_by_name(part).ok_or_else(|| {
            format!(
                "path variable `{path}`: {} has no field `{part}`",
                current.full_name()
            )
        })?;
        if field.is_list() || field.is_map() {
            return Err(format!(
                "path variable `{path}`: `{part}` is repeated; only singular fields can be bound"
            ));
        }
        let last = i + 1 == parts.len();
        match (field.kind(), last) {
            (Kind::Message(m), false) => current = m,
            (Kind::Message(m), true) => {
                return Err(format!(
                    "path variable `{path}` is a message ({}); bind one of its fields",
                    m.full_name()
                ))
            }
            (_, true) => return Ok(field),
            (_, false) => return Err(format!("path variable `{path}`: `{part}` is not a message")),
        }
    }
    Err(format!("path variable `{path}` is empty"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nanobox() -> RouteTable {
        let pool = DescriptorPool::decode(nanobox_proto::FILE_DESCRIPTOR_SET).unwrap();
        RouteTable::build(&pool, |s| (s.package_name() == "nanobox.v1").then_some(0)).unwrap()
    }

    fn found(table: &RouteTable, method: Method, path: &str) -> (String, Bindings) {
        match table.find(&method, path) {
            RouteMatch::Found(route, bindings) => (route.rpc_name(), bindings),
            other => panic!("{method} {path}: {other:?}"),
        }
    }

    /// The REST table of the seed README, every row served by the method api-spec.md
    /// names, derived from the protos alone.
    #[test]
    fn the_seed_table_is_derived_from_the_protos() {
        let table = nanobox();
        let rows = [
            ("POST", "/api/v1/sandboxes", "Sandboxes.Create"),
            ("GET", "/api/v1/sandboxes/{id}", "Sandboxes.Get"),
            ("GET", "/api/v1/sandboxes", "Sandboxes.List"),
            ("DELETE", "/api/v1/sandboxes/{id}", "Sandboxes.Delete"),
            ("POST", "/api/v1/sandboxes/{id}/exec", "Sandboxes.Exec"),
            (
                "POST",
                "/api/v1/sandboxes/{id}/keepalive",
                "Sandboxes.Keepalive",
            ),
            ("POST", "/api/v1/sandboxes/{id}/pause", "Sandboxes.Pause"),
            ("POST", "/api/v1/sandboxes/{id}/resume", "Sandboxes.Resume"),
            ("POST", "/api/v1/templates/warmup", "Templates.Warmup"),
            ("GET", "/api/v1/templates", "Templates.List"),
            ("GET", "/api/v1/templates/{name}/status", "Templates.Status"),
            ("DELETE", "/api/v1/templates/{name}", "Templates.Delete"),
            ("GET", "/api/v1/nodes", "Cluster.ListNodes"),
            ("GET", "/api/v1/stats", "Cluster.GetStats"),
        ];
        assert_eq!(table.routes().len(), rows.len());
        for (method, template, rpc) in rows {
            let path = template.replace("{id}", "sb-x").replace("{name}", "node22");
            let (got, bindings) = found(&table, method.parse().unwrap(), &path);
            assert_eq!(got, rpc, "{method} {template}");
            for (_, value) in bindings {
                assert!(value == "sb-x" || value == "node22");
            }
        }
    }

    #[test]
    fn literals_win_and_wrong_methods_are_405() {
        let table = nanobox();
        // `warmup` is a literal in POST /templates/warmup; DELETE /templates/{name} binds it.
        let (rpc, _) = found(&table, Method::POST, "/api/v1/templates/warmup");
        assert_eq!(rpc, "Templates.Warmup");
        let (rpc, b) = found(&table, Method::DELETE, "/api/v1/templates/warmup");
        assert_eq!(
            (rpc.as_str(), b[0].1.as_str()),
            ("Templates.Delete", "warmup")
        );
        match table.find(&Method::PUT, "/api/v1/sandboxes/sb-1") {
            RouteMatch::MethodNotAllowed(m) => assert_eq!(m, [Method::GET, Method::DELETE]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            table.find(&Method::GET, "/api/v1/nope"),
            RouteMatch::NotFound
        ));
    }

    #[test]
    fn rules_are_checked_against_the_messages() {
        let pool = DescriptorPool::decode(nanobox_proto::FILE_DESCRIPTOR_SET).unwrap();
        let method = pool
            .get_service_by_name("nanobox.v1.Sandboxes")
            .unwrap()
            .methods()
            .find(|m| m.name() == "Get")
            .unwrap();
        let rule = |pattern: Pattern, body: &str, response_body: &str| HttpRule {
            pattern: Some(pattern),
            body: body.into(),
            response_body: response_body.into(),
            ..HttpRule::default()
        };
        for (r, why) in [
            (
                rule(Pattern::Get("/x/{nope}".into()), "", ""),
                "has no field `nope`",
            ),
            (
                rule(Pattern::Post("/x".into()), "nope", ""),
                "body field `nope`",
            ),
            (
                rule(Pattern::Post("/x/{id}".into()), "id", ""),
                "also a path variable",
            ),
            (
                rule(Pattern::Get("/x".into()), "", "nope"),
                "response_body field `nope`",
            ),
        ] {
            let e = add_rule(&mut Vec::new(), &method, &r, 0, true)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("nanobox.v1.Sandboxes.Get") && e.contains(why),
                "{e}"
            );
        }
        let mut routes = Vec::new();
        let ok = rule(Pattern::Get("/x/{id}".into()), "", "sandbox");
        add_rule(&mut routes, &method, &ok, 0, true).unwrap();
        let e = add_rule(&mut routes, &method, &ok, 0, true).unwrap_err();
        assert!(e.to_string().contains("already bound"), "{e}");
    }
}
