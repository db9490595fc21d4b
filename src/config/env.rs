//! `${env:NAME}` in string values: secrets and addresses come from the environment
//! (systemd's `Environment=`/`EnvironmentFile=`, a container's `environment:`) instead of a
//! file that is world-readable or committed to git.
//!
//! The pass runs on the parsed document, before serde sees it, so every string value in
//! every table and array is covered, and a problem is reported at the string's own place
//! (`FILE:LINE:COL`), not at a place in some rewritten text. Keys are never expanded.
//!
//! - `${env:NAME}`: the variable's value; unset is an error.
//! - `${env:NAME:-default}`: the default when the variable is unset or empty (as in sh).
//! - `$${`: a literal `${`.
//!
//! The `env:` prefix keeps these apart from request variables (`${client_ip}`), which are
//! left for the header rules to read. In a header rule's value (a template) `$${` stays
//! as it is, and `${` inside a variable's value is written `$${`, so that the template
//! parser, which reads `$${` as a literal `${`, never mistakes either for a variable.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// Where variables come from: the process environment, or a map in tests.
pub(super) type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Expands every string value in `table`; problems are pushed with the span of the string
/// they are in. Returns the names of the variables read (values are never kept).
pub(super) fn expand(
    table: &mut DeTable<'_>,
    env: Lookup<'_>,
    problems: &mut Vec<(Range<usize>, String)>,
) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut path = Vec::new();
    walk_table(table, &mut path, env, problems, &mut used);
    used
}

fn walk_table<'i>(
    table: &mut DeTable<'i>,
    path: &mut Vec<String>,
    env: Lookup<'_>,
    problems: &mut Vec<(Range<usize>, String)>,
    used: &mut BTreeSet<String>,
) {
    for (key, value) in table.iter_mut() {
        path.push(key.get_ref().to_string());
        walk_value(value, path, env, problems, used);
        path.pop();
    }
}

fn walk_value<'i>(
    value: &mut toml::Spanned<DeValue<'i>>,
    path: &mut Vec<String>,
    env: Lookup<'_>,
    problems: &mut Vec<(Range<usize>, String)>,
    used: &mut BTreeSet<String>,
) {
    let span = value.span();
    match value.get_mut() {
        DeValue::String(s) => match expand_str(s, is_template(path), env, used) {
            Ok(Some(expanded)) => *s = Cow::Owned(expanded),
            Ok(None) => {}
            Err(why) => problems.push((span, format!("{}: {why}", path.join(".")))),
        },
        DeValue::Table(t) => walk_table(t, path, env, problems, used),
        DeValue::Array(items) => {
            for item in items.iter_mut() {
                walk_value(item, path, env, problems, used);
            }
        }
        _ => {}
    }
}

/// Header rules' `set` values are templates: `...headers.set.NAME`.
fn is_template(path: &[String]) -> bool {
    matches!(
        path,
        [.., rules, set, _] if (rules == "request_headers" || rules == "response_headers") && set == "set"
    )
}

/// `Ok(None)`: nothing to expand (the common case: no allocation).
fn expand_str(
    text: &str,
    template: bool,
    env: Lookup<'_>,
    used: &mut BTreeSet<String>,
) -> Result<Option<String>, String> {
    if !text.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$${") {
            out.push_str(if template { "$${" } else { "${" });
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${env:") {
            let Some(end) = after.find('}') else {
                return Err(format!("\"${{env:\" without a closing \"}}\" in {text:?}"));
            };
            let (name, default) = match after[..end].split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (&after[..end], None),
            };
            if !valid_name(name) {
                return Err(format!(
                    "invalid environment variable name {name:?}: letters, digits and '_', not starting with a digit"
                ));
            }
            used.insert(name.to_string());
            let value = match (env(name), default) {
                (Some(v), Some(d)) if v.is_empty() => d.to_string(),
                (Some(v), _) => v,
                (None, Some(d)) => d.to_string(),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (write ${{env:{name}:-default}} to give a default)"
                    ))
                }
            };
            if template {
                out.push_str(&value.replace("${", "$${"));
            } else {
                out.push_str(&value);
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(Some(out))
}

fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, template: bool) -> Result<Option<String>, String> {
        let env = |name: &str| match name {
            "PORT" => Some("8080".to_string()),
            "EMPTY" => Some(String::new()),
            "BRACE" => Some("a${b".to_string()),
            _ => None,
        };
        expand_str(text, template, &env, &mut BTreeSet::new())
    }

    #[test]
    fn expands_variables_defaults_and_escapes() {
        assert_eq!(run("plain", false), Ok(None));
        assert_eq!(
            run("0.0.0.0:${env:PORT}", false),
            Ok(Some("0.0.0.0:8080".into()))
        );
        assert_eq!(run("${env:NOPE:-9000}", false), Ok(Some("9000".into())));
        assert_eq!(run("${env:EMPTY:-x}", false), Ok(Some("x".into())));
        assert_eq!(run("${env:EMPTY}", false), Ok(Some(String::new())));
        assert_eq!(run("${env:PORT:-1}", false), Ok(Some("8080".into())));
        assert_eq!(
            run("cost: $5 $${env:PORT}", false),
            Ok(Some("cost: $5 ${env:PORT}".into()))
        );
        // Request variables are the header rules' business.
        assert_eq!(run("${client_ip}", false), Ok(Some("${client_ip}".into())));
    }

    #[test]
    fn templates_keep_escapes_for_the_template_parser() {
        assert_eq!(run("$${x}", true), Ok(Some("$${x}".into())));
        assert_eq!(run("${env:BRACE}", true), Ok(Some("a$${b".into())));
        assert_eq!(run("${client_ip}", true), Ok(Some("${client_ip}".into())));
    }

    #[test]
    fn says_what_is_wrong() {
        let e = run("${env:NOPE}", false).unwrap_err();
        assert!(e.contains("NOPE is not set"), "{e}");
        let e = run("${env:PORT", false).unwrap_err();
        assert!(e.contains("without a closing"), "{e}");
        let e = run("${env:1X}", false).unwrap_err();
        assert!(e.contains("invalid environment variable name"), "{e}");
    }

    #[test]
    fn a_document_reports_each_problem_at_its_string() {
        let text = "a = \"${env:PORT}\"\n[t]\nb = [\"x\", \"${env:NOPE}\"]\n[t.request_headers.set]\nX = \"${env:BRACE}\"\n";
        let mut doc = DeTable::parse(text).unwrap().into_inner();
        let env = |name: &str| match name {
            "PORT" => Some("1".to_string()),
            "BRACE" => Some("{${".to_string()),
            _ => None,
        };
        let mut problems = Vec::new();
        let used = expand(&mut doc, &env, &mut problems);
        assert_eq!(
            used.into_iter().collect::<Vec<_>>(),
            ["BRACE", "NOPE", "PORT"]
        );
        assert_eq!(problems.len(), 1);
        assert_eq!(&text[problems[0].0.clone()], "\"${env:NOPE}\"");
        assert!(problems[0].1.starts_with("t.b: "), "{}", problems[0].1);
        assert_eq!(doc.get("a").unwrap().get_ref().as_str(), Some("1"));
    }
}
