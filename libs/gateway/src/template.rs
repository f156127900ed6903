//! `google.api.http` path templates (`/api/v1/sandboxes/{id}/exec`): parsing and matching
//! request paths against them.
//!
//! The grammar, from `google/api/http.proto`:
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! `{id}` is short for `{id=*}`. As in grpc-gateway, `**` may only be the last segment.

use percent_encoding::percent_decode_str;

use crate::error::RouteError;

/// One segment matcher.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Exactly this text.
    Literal(String),
    /// Any one segment (`*`).
    One,
    /// The rest of the path, one or more segments (`**`).
    Rest,
}

/// A variable: the request field it sets and the segments it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// The field path, dotted (`id`, `sandbox.id`).
    pub field: String,
    /// Index of its first segment.
    start: usize,
    /// Index one past its last segment (equal to the segment count for a trailing `**`).
    end: usize,
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    text: String,
    segments: Vec<Segment>,
    variables: Vec<Variable>,
    verb: Option<String>,
}

/// The variables of a matched path: (field path, decoded value), in template order.
pub type Bindings = Vec<(String, String)>;

impl PathTemplate {
    /// Parses `text`. Errors name the template and what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, RouteError> {
        let bad = |why: &str| RouteError::Template {
            template: text.to_owned(),
            message: why.to_owned(),
        };
        let rest = text
            .strip_prefix('/')
            .ok_or_else(|| bad("must start with `/`"))?;
        // The verb is a `:` after the last segment, outside any variable.
        let (body, verb) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('}') && !rest[i..].contains('/') => {
                (&rest[..i], Some(rest[i + 1..].to_owned()))
            }
            _ => (rest, None),
        };
        if verb.as_deref() == Some("") {
            return Err(bad("empty verb after `:`"));
        }
        let mut segments = Vec::new();
        let mut variables: Vec<Variable> = Vec::new();
        let mut chars = body;
        while !chars.is_empty() {
            if let Some(after) = chars.strip_prefix('{') {
                let close = after
                    .find('}')
                    .ok_or_else(|| bad("`{` without a closing `}`"))?;
                let inner = &after[..close];
                let (field, pattern) = match inner.split_once('=') {
                    Some((f, p)) => (f, p),
                    None => (inner, "*"),
                };
                if field.is_empty()
                    || !field.split('.').all(|part| {
                        !part.is_empty()
                            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    })
                {
                    return Err(bad(&format!("`{field}` is not a field path")));
                }
                if variables.iter().any(|v| v.field == field) {
                    return Err(bad(&format!("`{field}` is bound twice")));
                }
                let start = segments.len();
                for part in pattern.split('/') {
                    segments.push(parse_segment(part, true).map_err(|m| bad(&m))?);
                }
                variables.push(Variable {
                    field: field.to_owned(),
                    start,
                    end: segments.len(),
                });
                chars = &after[close + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let part = &chars[..end];
                segments.push(parse_segment(part, false).map_err(|m| bad(&m))?);
                chars = &chars[end..];
            }
            // Between segments: a `/`, or the end.
            if let Some(after) = chars.strip_prefix('/') {
                if after.is_empty() {
                    return Err(bad("trailing `/`"));
                }
                chars = after;
            } else if !chars.is_empty() {
                return Err(bad("`}` must be followed by `/` or the end"));
            }
        }
        if segments.is_empty() {
            return Err(bad("no segments"));
        }
        if let Some(i) = segments.iter().position(|s| *s == Segment::Rest) {
            if i + 1 != segments.len() {
                return Err(bad("`**` must be the last segment"));
            }
        }
        Ok(Self {
            text: text.to_owned(),
            segments,
            variables,
            verb,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The variables, in order.
    pub fn variables(&self) -> &[Variable] {
        &self.variables
    }

    /// How many literal segments the template has: among templates matching the same path,
    /// the one with more literals is the more specific and wins.
    pub fn literal_count(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }

    /// The template in OpenAPI form: every variable as `{field}` (OpenAPI has no
    /// multi-segment parameters).
    pub fn openapi_path(&self) -> String {
        let mut out = String::new();
        let mut i = 0;
        while i < self.segments.len() {
            out.push('/');
            if let Some(v) = self.variables.iter().find(|v| v.start == i) {
                out.push('{');
                out.push_str(&v.field);
                out.push('}');
                i = v.end.max(i + 1);
                continue;
            }
            match &self.segments[i] {
                Segment::Literal(l) => out.push_str(l),
                Segment::One => out.push('*'),
                Segment::Rest => out.push_str("**"),
            }
            i += 1;
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(verb);
        }
        out
    }

    /// Matches a request path (as sent, percent-encoded, without the query). Returns the
    /// variables' values, percent-decoded, or `None` if the path does not match. A value
    /// that is not valid UTF-8 after decoding does not match.
    pub fn matches(&self, path: &str) -> Option<Bindings> {
        let rest = path.strip_prefix('/')?;
        let rest = match &self.verb {
            Some(verb) => rest.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => rest,
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let rest_at = match self.segments.last() {
            Some(Segment::Rest) => Some(self.segments.len() - 1),
            _ => None,
        };
        match rest_at {
            Some(at) if parts.len() <= at => return None,
            None if parts.len() != self.segments.len() => return None,
            _ => {}
        }
        for (segment, part) in self.segments.iter().zip(&parts) {
            if part.is_empty() {
                return None;
            }
            if let Segment::Literal(literal) = segment {
                if decode(part)? != *literal {
                    return None;
                }
            }
        }
        if rest_at.is_some() && parts.iter().skip(self.segments.len()).any(|p| p.is_empty()) {
            return None;
        }
        let mut bindings = Vec::with_capacity(self.variables.len());
        for v in &self.variables {
            let end = if v.end == self.segments.len() {
                parts.len()
            } else {
                v.end
            };
            let value = if end - v.start == 1 {
                // A single-segment value is decoded whole, `%2F` included.
                decode(parts[v.start])?
            } else {
                // Multi-segment values keep their `/` separators: each part is decoded on
                // its own so an encoded `%2F` stays distinguishable.
                let decoded: Option<Vec<String>> =
                    parts[v.start..end].iter().map(|p| decode(p)).collect();
                decoded?.join("/")
            };
            bindings.push((v.field.clone(), value));
        }
        Some(bindings)
    }
}

fn parse_segment(part: &str, in_variable: bool) -> Result<Segment, String> {
    match part {
        "" => Err("empty segment".to_owned()),
        "*" => Ok(Segment::One),
        "**" => Ok(Segment::Rest),
        _ if part.contains(['{', '}', '=', '*']) => Err(format!(
            "`{part}` is not a valid {}segment",
            if in_variable { "variable " } else { "" }
        )),
        _ => Ok(Segment::Literal(part.to_owned())),
    }
}

fn decode(part: &str) -> Option<String> {
    percent_decode_str(part)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(pairs: &[(&str, &str)]) -> Option<Bindings> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn simple_variables() {
        let t = PathTemplate::parse("/api/v1/sandboxes/{id}/exec").unwrap();
        assert_eq!(
            t.matches("/api/v1/sandboxes/sb-1/exec"),
            b(&[("id", "sb-1")])
        );
        assert_eq!(
            t.matches("/api/v1/sandboxes/sb%2F1/exec"),
            b(&[("id", "sb/1")])
        );
        assert_eq!(t.matches("/api/v1/sandboxes//exec"), None);
        assert_eq!(t.matches("/api/v1/sandboxes/sb-1"), None);
        assert_eq!(t.matches("/api/v1/sandboxes/sb-1/exec/x"), None);
        assert_eq!(t.matches("/api/v1/sandboxes/sb-1/exec/"), None);
        assert_eq!(t.literal_count(), 4);
        assert_eq!(t.openapi_path(), "/api/v1/sandboxes/{id}/exec");

        let t = PathTemplate::parse("/api/v1/sandboxes").unwrap();
        assert_eq!(t.matches("/api/v1/sandboxes"), b(&[]));
        assert_eq!(t.matches("/api/v1/sandboxes/"), None);
        assert_eq!(t.matches("/api/v1/sandbox"), None);
    }

    #[test]
    fn patterns_verbs_and_nested_fields() {
        let t = PathTemplate::parse("/v1/{name=projects/*/files/**}:get").unwrap();
        assert_eq!(
            t.matches("/v1/projects/p1/files/a/b%20c:get"),
            b(&[("name", "projects/p1/files/a/b c")])
        );
        assert_eq!(t.matches("/v1/projects/p1/files:get"), None);
        assert_eq!(t.matches("/v1/projects/p1/files/a"), None);
        assert_eq!(t.openapi_path(), "/v1/{name}:get");

        let t = PathTemplate::parse("/v1/{sandbox.id}/x/*").unwrap();
        assert_eq!(t.matches("/v1/a/x/y"), b(&[("sandbox.id", "a")]));
    }

    #[test]
    fn bad_templates_are_named() {
        for (template, why) in [
            ("api/v1", "must start with `/`"),
            ("/a/{id", "without a closing"),
            ("/a/{}", "not a field path"),
            ("/a/{id}/{id}", "bound twice"),
            ("/a/**/b", "must be the last"),
            ("/a//b", "empty segment"),
            ("/a/", "trailing `/`"),
            ("/a/b*c", "not a valid segment"),
        ] {
            let e = PathTemplate::parse(template).unwrap_err().to_string();
            assert!(e.contains(template) && e.contains(why), "{template}: {e}");
        }
    }
}
