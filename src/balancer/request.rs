//! The balancer's requests: each client call read once into a typed value, and the one list
//! of its methods, with their help, that `system.listMethods` and `system.methodHelp` answer
//! from.
//!
//! `put`, `get`, `get_versions` and `delete` take a struct of per-request options as their
//! last parameter ([`WriteOptions`], [`ReadOptions`]): this request's W or R, a bound on its
//! replica calls, and for writes a receipt. They are read here, once, into typed values; the
//! one check that needs the cluster (a quorum larger than the key's N) is made when the
//! request is planned ([`quorum_for`]).

use std::collections::BTreeMap;
use std::time::Duration;

use dxr::Value;

use crate::error::{Error, Result};
use crate::rpc::codec::Param;
use crate::rpc::params::{delete_params, key_param, put_params};
use crate::rpc::server::{self, expect_params};
use crate::version::VClock;

/// The longest `timeout_ms` a request may ask for. A request waits at most this long for a
/// replica; a client that would wait longer should retry rather than hold a balancer's
/// memory (and a node's queue) for minutes. Larger values are refused, not cut, so that a
/// client learns its bound is not the one applied.
pub const MAX_TIMEOUT_MS: i64 = 60_000;

/// A write's options: `put(key, value, context, options)`, `delete(key, context, options)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// This request's W, instead of the daemon's; at most the key's N ([`quorum_for`]).
    pub w: Option<usize>,
    /// Bounds each of this request's replica calls instead of `--timeout-ms`.
    pub timeout: Option<Duration>,
    /// Answer `{status, context, replicas}` instead of `"200"`.
    pub receipt: bool,
}

/// A read's options: `get(key, options)`, `get_versions(key, options)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// This request's R, instead of the daemon's; at most the key's N ([`quorum_for`]).
    pub r: Option<usize>,
    /// Bounds each of this request's replica calls instead of `--timeout-ms`.
    pub timeout: Option<Duration>,
}

/// The members an options struct may hold, by the kind of request.
const WRITE_OPTIONS: &str = "w, timeout_ms and receipt";
const READ_OPTIONS: &str = "r and timeout_ms";

/// The options struct's members, or why it is none. Fault texts name our own option names
/// only, never a member the client sent (faults do not echo requests).
fn option_members<'a>(param: &'a Param, method: &str) -> Result<&'a BTreeMap<String, Value>> {
    match param.tree() {
        Some(Value::Struct(members)) => Ok(members),
        _ => Err(Error::invalid(format!(
            "{method}'s options must be a struct"
        ))),
    }
}

/// A positive integer option (`i4` or `i8`), at most `max`.
fn positive(value: &Value, name: &str, max: i64) -> Result<i64> {
    let n = match value {
        Value::Integer(n) => i64::from(*n),
        Value::Long(n) => *n,
        _ => return Err(Error::invalid(format!("option {name} must be an integer"))),
    };
    if (1..=max).contains(&n) {
        Ok(n)
    } else if max == i64::MAX {
        Err(Error::invalid(format!("option {name} must be at least 1")))
    } else {
        Err(Error::invalid(format!(
            "option {name} must be between 1 and {max}"
        )))
    }
}

fn quorum_option(value: &Value, name: &str) -> Result<usize> {
    let n = positive(value, name, i64::MAX)?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

fn timeout_option(value: &Value) -> Result<Duration> {
    let ms = positive(value, "timeout_ms", MAX_TIMEOUT_MS)?;
    Ok(Duration::from_millis(ms.unsigned_abs()))
}

impl WriteOptions {
    /// Reads `put`'s or `delete`'s options struct.
    pub fn parse(param: &Param, method: &str) -> Result<WriteOptions> {
        let mut options = WriteOptions::default();
        for (name, value) in option_members(param, method)? {
            match name.as_str() {
                "w" => options.w = Some(quorum_option(value, "w")?),
                "timeout_ms" => options.timeout = Some(timeout_option(value)?),
                "receipt" => match value {
                    Value::Boolean(receipt) => options.receipt = *receipt,
                    _ => return Err(Error::invalid("option receipt must be a boolean")),
                },
                "r" => {
                    return Err(Error::invalid(format!(
                        "{method} takes w, not r (the read quorum)"
                    )));
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "unknown option: {method} takes {WRITE_OPTIONS}"
                    )));
                }
            }
        }
        Ok(options)
    }
}

impl ReadOptions {
    /// Reads `get`'s or `get_versions`' options struct.
    pub fn parse(param: &Param, method: &str) -> Result<ReadOptions> {
        let mut options = ReadOptions::default();
        for (name, value) in option_members(param, method)? {
            match name.as_str() {
                "r" => options.r = Some(quorum_option(value, "r")?),
                "timeout_ms" => options.timeout = Some(timeout_option(value)?),
                "w" | "receipt" => {
                    return Err(Error::invalid(format!(
                        "{method} takes r and timeout_ms; w and receipt are a write's"
                    )));
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "unknown option: {method} takes {READ_OPTIONS}"
                    )));
                }
            }
        }
        Ok(options)
    }
}

/// The quorum a request needs among a key's `n` replicas: the one it asked for (`asked`,
/// its option `letter`, `w` or `r`), which may not exceed `n`, else `default`. Checked when
/// the request is planned, against the N of every live layout version of the key.
pub fn quorum_for(asked: Option<usize>, letter: &str, n: usize, default: usize) -> Result<usize> {
    match asked {
        None => Ok(default),
        Some(q) if q <= n => Ok(q),
        Some(q) => Err(Error::invalid(format!(
            "option {letter} = {q} is more than the key's {n} replicas (N)"
        ))),
    }
}

/// Checks a call's parameter count against the forms `method` takes (`forms`, for the text).
fn expect_between(
    params: &[Param],
    counts: std::ops::RangeInclusive<usize>,
    method: &str,
    forms: &str,
) -> Result<()> {
    if counts.contains(&params.len()) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{method} takes {forms}, got {} parameters",
            params.len()
        )))
    }
}

/// Takes the options struct off a call that has `with` parameters in its options form.
/// `context_at` is the context's place, if the call has one: in the options form a context of
/// `""` means none, a blind write, as the form without a context (in the form without
/// options, `""` stays what it always was: the empty context get_versions gives for a
/// missing key, which supersedes nothing).
fn take_options(params: &mut Vec<Param>, with: usize, context_at: Option<usize>) -> Option<Param> {
    if params.len() != with {
        return None;
    }
    let options = params.pop();
    if let Some(at) = context_at
        && matches!(params.get(at).and_then(Param::tree), Some(Value::String(c)) if c.is_empty())
    {
        params.truncate(at);
    }
    options
}

/// The balancer's methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Put,
    Get,
    GetVersions,
    Delete,
    Stats,
    Explain,
    /// The `cluster.*` methods, by index in [`crate::membership::status::METHODS`].
    Cluster(usize),
}

/// A client's call, read.
#[derive(Debug, Clone)]
pub enum Request {
    /// `value` is its XML text; `context` what the client had seen (none: a blind put).
    Put {
        key: String,
        value: String,
        context: Option<VClock>,
        options: WriteOptions,
    },
    Get {
        key: String,
        options: ReadOptions,
    },
    GetVersions {
        key: String,
        options: ReadOptions,
    },
    Delete {
        key: String,
        context: Option<VClock>,
        options: WriteOptions,
    },
    Stats,
    Explain {
        key: String,
    },
    Cluster(crate::membership::status::ClusterCall),
}

impl server::Request for Request {
    type Method = Method;

    const METHODS: &'static [Method] = &[
        Method::Put,
        Method::Get,
        Method::GetVersions,
        Method::Delete,
        Method::Stats,
        Method::Explain,
        Method::Cluster(0),
        Method::Cluster(1),
        Method::Cluster(2),
        Method::Cluster(3),
        Method::Cluster(4),
        Method::Cluster(5),
        Method::Cluster(6),
        Method::Cluster(7),
    ];

    fn name(method: Method) -> &'static str {
        match method {
            Method::Put => "put",
            Method::Get => "get",
            Method::GetVersions => "get_versions",
            Method::Delete => "delete",
            Method::Stats => "stats",
            Method::Explain => "explain",
            Method::Cluster(i) => crate::membership::status::METHODS
                .get(i)
                .map_or("cluster.?", |(name, _)| name),
        }
    }

    fn help(method: Method) -> &'static str {
        match method {
            Method::Put => {
                "put(key, value[, context[, options]]) -> \"200\" once W replicas stored the value. options: {w: 1..N, timeout_ms: 1..60000, receipt: boolean} (context \"\" there: none); with receipt, {status: \"200\", context, replicas: [{address, fallback}]}: the replicas that acknowledged"
            }
            Method::Get => {
                "get(key[, options]) -> the value of the version written last, or nil. options: {r: 1..N, timeout_ms: 1..60000}"
            }
            Method::GetVersions => {
                "get_versions(key[, options]) -> {values: [sibling values, latest first], context}. options: {r: 1..N, timeout_ms: 1..60000}"
            }
            Method::Delete => {
                "delete(key[, context[, options]]) -> \"200\" once W replicas stored the tombstone. options: as put's"
            }
            Method::Stats => "stats() -> {servers: [{address, state}], N, R, W, counters}",
            Method::Explain => {
                "explain(key) -> {key, partition, layouts: [{version, reads, replicas: [{address, role, for, state}]}], stored: [{address, versions, hints}]}"
            }
            Method::Cluster(i) => crate::membership::status::METHODS
                .get(i)
                .map_or("cluster.?() -> ?", |(_, help)| help),
        }
    }

    /// `cluster.*` changes (and shows) the layout: the cluster's daemons and its operator only.
    fn access(method: Method) -> crate::security::Access {
        match method {
            Method::Cluster(_) => crate::security::Access::Internal,
            _ => crate::security::Access::Client,
        }
    }

    fn parse(method: Method, params: Vec<Param>) -> Result<Request> {
        Ok(match method {
            Method::Put => {
                let mut params = params;
                expect_between(&params, 2..=4, "put", "(key, value[, context[, options]])")?;
                let options = take_options(&mut params, 4, Some(2))
                    .map(|options| WriteOptions::parse(&options, "put"))
                    .transpose()?
                    .unwrap_or_default();
                let (key, value, context) = put_params(params)?;
                Request::Put {
                    key,
                    value,
                    context,
                    options,
                }
            }
            Method::Get | Method::GetVersions => {
                let mut params = params;
                let name = Self::name(method);
                expect_between(&params, 1..=2, name, "(key[, options])")?;
                let options = take_options(&mut params, 2, None)
                    .map(|options| ReadOptions::parse(&options, name))
                    .transpose()?
                    .unwrap_or_default();
                let key = key_param(params)?;
                if method == Method::Get {
                    Request::Get { key, options }
                } else {
                    Request::GetVersions { key, options }
                }
            }
            Method::Delete => {
                let mut params = params;
                expect_between(&params, 1..=3, "delete", "(key[, context[, options]])")?;
                let options = take_options(&mut params, 3, Some(1))
                    .map(|options| WriteOptions::parse(&options, "delete"))
                    .transpose()?
                    .unwrap_or_default();
                let (key, context) = delete_params(params)?;
                Request::Delete {
                    key,
                    context,
                    options,
                }
            }
            Method::Stats => {
                expect_params(&params, 0)?;
                Request::Stats
            }
            Method::Explain => Request::Explain {
                key: key_param(params)?,
            },
            Method::Cluster(i) => Request::Cluster(crate::membership::status::parse(i, params)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::server::Request as _;
    use dxr::Value;

    fn text(s: &str) -> Param {
        Param::Tree(Value::String(s.into()))
    }

    /// Every method has a name that reads back to it and a help that starts with its call.
    #[test]
    fn methods_are_listed_once_with_their_help() {
        for &method in Request::METHODS {
            let name = Request::name(method);
            assert!(
                Request::help(method).starts_with(&format!("{name}(")),
                "{name}"
            );
        }
        let names: Vec<&str> = Request::METHODS.iter().map(|&m| Request::name(m)).collect();
        assert_eq!(
            names[..6],
            ["put", "get", "get_versions", "delete", "stats", "explain"]
        );
        let cluster: Vec<&str> = crate::membership::status::METHODS
            .iter()
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(names[6..], cluster[..]);
    }

    #[test]
    fn parse_table() {
        let cases: Vec<(Method, Vec<Param>, std::result::Result<Request, i32>)> = vec![
            (
                Method::Put,
                vec![text("k"), Param::Text("<value><i4>1</i4></value>".into())],
                Ok(Request::Put {
                    key: "k".into(),
                    value: "<value><i4>1</i4></value>".into(),
                    context: None,
                    options: WriteOptions::default(),
                }),
            ),
            (
                Method::Put,
                vec![text("k"), text("v")],
                Ok(Request::Put {
                    key: "k".into(),
                    value: "<value><string>v</string></value>".into(),
                    context: None,
                    options: WriteOptions::default(),
                }),
            ),
            (Method::Put, vec![text("k")], Err(-32602)),
            (
                Method::Put,
                vec![text("k"), Param::Tree(Value::Nil)],
                Err(-32602),
            ),
            (
                Method::Put,
                vec![text("k"), text("v"), text("not a context")],
                Err(-32602),
            ),
            (
                Method::Get,
                vec![text("k")],
                Ok(Request::Get {
                    key: "k".into(),
                    options: ReadOptions::default(),
                }),
            ),
            (
                Method::Get,
                vec![Param::Tree(Value::Integer(1))],
                Err(-32602),
            ),
            (
                Method::GetVersions,
                vec![text("k")],
                Ok(Request::GetVersions {
                    key: "k".into(),
                    options: ReadOptions::default(),
                }),
            ),
            (
                Method::Delete,
                vec![text("k")],
                Ok(Request::Delete {
                    key: "k".into(),
                    context: None,
                    options: WriteOptions::default(),
                }),
            ),
            (Method::Stats, vec![], Ok(Request::Stats)),
            (Method::Stats, vec![text("x")], Err(-32602)),
        ];
        for (method, params, expected) in cases {
            let got = Request::parse(method, params).map_err(|error| error.fault_code());
            assert_eq!(format!("{got:?}"), format!("{expected:?}"), "{method:?}");
        }
    }

    fn options(members: &[(&str, Value)]) -> Param {
        Param::Tree(Value::Struct(
            members
                .iter()
                .map(|(name, value)| ((*name).to_owned(), value.clone()))
                .collect(),
        ))
    }

    fn a_context() -> (String, VClock) {
        let mut clock = VClock::new();
        clock.witness(
            crate::version::Dot {
                actor: 7,
                counter: 3,
            },
            1_000,
        );
        (clock.to_context(), clock)
    }

    /// Every shape of options struct, valid and not, on every method that takes one: what it
    /// reads as, or the fault's code and a piece of its text.
    #[test]
    fn options_table() {
        use Value::{Boolean, Integer, Long};
        let (context_text, context) = a_context();
        let put = |context: &str, members: &[(&str, Value)]| {
            vec![text("k"), text("v"), text(context), options(members)]
        };
        let put_request = |context: Option<VClock>, options: WriteOptions| Request::Put {
            key: "k".into(),
            value: "<value><string>v</string></value>".into(),
            context,
            options,
        };
        let get = |members: &[(&str, Value)]| vec![text("k"), options(members)];
        let ms = Duration::from_millis;
        type Expected = std::result::Result<Request, (i32, &'static str)>;
        let cases: Vec<(Method, Vec<Param>, Expected)> = vec![
            // Writes: every option, and "" as the context meaning none.
            (
                Method::Put,
                put(
                    "",
                    &[
                        ("w", Integer(1)),
                        ("timeout_ms", Integer(250)),
                        ("receipt", Boolean(true)),
                    ],
                ),
                Ok(put_request(
                    None,
                    WriteOptions {
                        w: Some(1),
                        timeout: Some(ms(250)),
                        receipt: true,
                    },
                )),
            ),
            // A context beside the options is read as ever.
            (
                Method::Put,
                put(&context_text, &[("w", Long(3))]),
                Ok(put_request(
                    Some(context.clone()),
                    WriteOptions {
                        w: Some(3),
                        ..WriteOptions::default()
                    },
                )),
            ),
            // An empty struct: no option, as without one.
            (
                Method::Put,
                put("", &[]),
                Ok(put_request(None, WriteOptions::default())),
            ),
            (
                Method::Put,
                put("", &[("receipt", Boolean(false))]),
                Ok(put_request(None, WriteOptions::default())),
            ),
            // Without options, "" stays the empty context it always was.
            (
                Method::Put,
                vec![text("k"), text("v"), text("")],
                Ok(put_request(Some(VClock::new()), WriteOptions::default())),
            ),
            // The bounds: 60000 ms is the longest; a W far above any N is read here and
            // refused when the key's N is known.
            (
                Method::Put,
                put(
                    "",
                    &[("timeout_ms", Long(MAX_TIMEOUT_MS)), ("w", Long(1 << 40))],
                ),
                Ok(put_request(
                    None,
                    WriteOptions {
                        w: Some(1 << 40),
                        timeout: Some(ms(60_000)),
                        receipt: false,
                    },
                )),
            ),
            (
                Method::Put,
                put("", &[("r", Integer(1))]),
                Err((-32602, "put takes w, not r")),
            ),
            (
                Method::Put,
                put("", &[("consistency", text_value("all"))]),
                Err((
                    -32602,
                    "unknown option: put takes w, timeout_ms and receipt",
                )),
            ),
            (
                Method::Put,
                put("", &[("w", Integer(0))]),
                Err((-32602, "option w must be at least 1")),
            ),
            (
                Method::Put,
                put("", &[("w", Integer(-2))]),
                Err((-32602, "option w must be at least 1")),
            ),
            (
                Method::Put,
                put("", &[("w", text_value("2"))]),
                Err((-32602, "option w must be an integer")),
            ),
            (
                Method::Put,
                put("", &[("timeout_ms", Integer(0))]),
                Err((-32602, "option timeout_ms must be between 1 and 60000")),
            ),
            (
                Method::Put,
                put("", &[("timeout_ms", Long(MAX_TIMEOUT_MS + 1))]),
                Err((-32602, "option timeout_ms must be between 1 and 60000")),
            ),
            (
                Method::Put,
                put("", &[("timeout_ms", Long(i64::MAX))]),
                Err((-32602, "option timeout_ms must be between 1 and 60000")),
            ),
            (
                Method::Put,
                put("", &[("timeout_ms", Value::Double(10.0))]),
                Err((-32602, "option timeout_ms must be an integer")),
            ),
            (
                Method::Put,
                put("", &[("receipt", Integer(1))]),
                Err((-32602, "option receipt must be a boolean")),
            ),
            (
                Method::Put,
                put("", &[("receipt", text_value("true"))]),
                Err((-32602, "option receipt must be a boolean")),
            ),
            // Options that are not a struct.
            (
                Method::Put,
                vec![text("k"), text("v"), text(""), text("w=1")],
                Err((-32602, "put's options must be a struct")),
            ),
            (
                Method::Put,
                vec![text("k"), text("v"), text(""), Param::Tree(Value::Nil)],
                Err((-32602, "put's options must be a struct")),
            ),
            (
                Method::Put,
                vec![
                    text("k"),
                    text("v"),
                    text(""),
                    Param::Tree(Value::Array(vec![Integer(1)])),
                ],
                Err((-32602, "put's options must be a struct")),
            ),
            // The context beside options is checked as ever.
            (
                Method::Put,
                put("not a context", &[]),
                Err((-32602, "the context is not one get_versions returned")),
            ),
            (
                Method::Put,
                vec![text("k"), text("v"), text(""), options(&[]), options(&[])],
                Err((
                    -32602,
                    "put takes (key, value[, context[, options]]), got 5",
                )),
            ),
            // Deletes take the same options, after a context.
            (
                Method::Delete,
                vec![
                    text("k"),
                    text(""),
                    options(&[("w", Integer(2)), ("receipt", Boolean(true))]),
                ],
                Ok(Request::Delete {
                    key: "k".into(),
                    context: None,
                    options: WriteOptions {
                        w: Some(2),
                        timeout: None,
                        receipt: true,
                    },
                }),
            ),
            (
                Method::Delete,
                vec![text("k"), text(&context_text), options(&[])],
                Ok(Request::Delete {
                    key: "k".into(),
                    context: Some(context.clone()),
                    options: WriteOptions::default(),
                }),
            ),
            (
                Method::Delete,
                vec![text("k"), text(""), options(&[("r", Integer(1))])],
                Err((-32602, "delete takes w, not r")),
            ),
            (
                Method::Delete,
                vec![text("k"), options(&[])],
                Err((-32602, "the context must be a string")),
            ),
            (
                Method::Delete,
                vec![text("k"), text(""), options(&[]), options(&[])],
                Err((-32602, "delete takes (key[, context[, options]]), got 4")),
            ),
            // Reads.
            (
                Method::Get,
                get(&[("r", Integer(3)), ("timeout_ms", Integer(1))]),
                Ok(Request::Get {
                    key: "k".into(),
                    options: ReadOptions {
                        r: Some(3),
                        timeout: Some(ms(1)),
                    },
                }),
            ),
            (
                Method::GetVersions,
                get(&[("timeout_ms", Integer(100))]),
                Ok(Request::GetVersions {
                    key: "k".into(),
                    options: ReadOptions {
                        r: None,
                        timeout: Some(ms(100)),
                    },
                }),
            ),
            (
                Method::Get,
                get(&[("w", Integer(1))]),
                Err((
                    -32602,
                    "get takes r and timeout_ms; w and receipt are a write's",
                )),
            ),
            (
                Method::GetVersions,
                get(&[("receipt", Boolean(true))]),
                Err((
                    -32602,
                    "get_versions takes r and timeout_ms; w and receipt are a write's",
                )),
            ),
            (
                Method::Get,
                get(&[("R", Integer(1))]),
                Err((-32602, "unknown option: get takes r and timeout_ms")),
            ),
            (
                Method::Get,
                get(&[("r", Integer(0))]),
                Err((-32602, "option r must be at least 1")),
            ),
            (
                Method::Get,
                vec![text("k"), text("")],
                Err((-32602, "get's options must be a struct")),
            ),
            (
                Method::Get,
                vec![text("k"), options(&[]), options(&[])],
                Err((-32602, "get takes (key[, options]), got 3")),
            ),
        ];
        for (i, (method, params, expected)) in cases.into_iter().enumerate() {
            match (Request::parse(method, params), expected) {
                (Ok(got), Ok(expected)) => {
                    assert_eq!(format!("{got:?}"), format!("{expected:?}"), "case {i}")
                }
                (Err(error), Err((code, words))) => {
                    assert_eq!(error.fault_code(), code, "case {i}: {error}");
                    assert!(
                        error.fault_string().contains(words),
                        "case {i}: {:?} does not say {words:?}",
                        error.fault_string()
                    );
                }
                (got, expected) => panic!("case {i}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    fn text_value(s: &str) -> Value {
        Value::String(s.into())
    }

    /// A request's own W or R may not exceed the key's N; without one, the daemon's.
    #[test]
    fn quorum_table() {
        // (asked, N, default) -> quorum, or the fault's text
        type Case = (
            Option<usize>,
            usize,
            usize,
            std::result::Result<usize, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (None, 3, 2, Ok(2)),
            (Some(1), 3, 2, Ok(1)),
            (Some(3), 3, 2, Ok(3)),
            (
                Some(4),
                3,
                2,
                Err("option w = 4 is more than the key's 3 replicas (N)"),
            ),
            // A layout of two nodes holds two replicas.
            (
                Some(3),
                2,
                2,
                Err("option w = 3 is more than the key's 2 replicas (N)"),
            ),
            (Some(1 << 40), 3, 2, Err("option w = 1099511627776 is more")),
        ];
        for (asked, n, default, expected) in cases {
            let got = quorum_for(asked, "w", n, default);
            match (got, expected) {
                (Ok(got), Ok(expected)) => assert_eq!(got, expected, "{asked:?} of {n}"),
                (Err(error), Err(words)) => {
                    assert_eq!(error.fault_code(), -32602);
                    assert!(error.fault_string().contains(words), "{error}");
                }
                (got, expected) => panic!("{asked:?} of {n}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    /// The help names every option and the bound on timeout_ms.
    #[test]
    fn help_names_the_options() {
        let bound = MAX_TIMEOUT_MS.to_string();
        for (method, options) in [
            (Method::Put, &["w", "timeout_ms", "receipt"][..]),
            (Method::Get, &["r", "timeout_ms"]),
            (Method::GetVersions, &["r", "timeout_ms"]),
        ] {
            let help = Request::help(method);
            for option in options {
                assert!(help.contains(option), "{help}");
            }
            assert!(help.contains(&bound), "{help}");
        }
        assert!(Request::help(Method::Delete).contains("options"));
    }
}
