//! The balancer's requests: each client call read once into a typed value, and the one list
//! of its methods, with their help, that `system.listMethods` and `system.methodHelp` answer
//! from.

use crate::error::Result;
use crate::rpc::codec::Param;
use crate::rpc::params::{delete_params, key_param, put_params};
use crate::rpc::server::{self, expect_params};
use crate::version::VClock;

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
    },
    Get {
        key: String,
    },
    GetVersions {
        key: String,
    },
    Delete {
        key: String,
        context: Option<VClock>,
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
            Method::Put => "put(key, value[, context]) -> \"200\" once W replicas stored the value",
            Method::Get => "get(key) -> the value of the version written last, or nil",
            Method::GetVersions => {
                "get_versions(key) -> {values: [sibling values, latest first], context}"
            }
            Method::Delete => {
                "delete(key[, context]) -> \"200\" once W replicas stored the tombstone"
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
                let (key, value, context) = put_params(params)?;
                Request::Put {
                    key,
                    value,
                    context,
                }
            }
            Method::Get => Request::Get {
                key: key_param(params)?,
            },
            Method::GetVersions => Request::GetVersions {
                key: key_param(params)?,
            },
            Method::Delete => {
                let (key, context) = delete_params(params)?;
                Request::Delete { key, context }
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
                }),
            ),
            (
                Method::Put,
                vec![text("k"), text("v")],
                Ok(Request::Put {
                    key: "k".into(),
                    value: "<value><string>v</string></value>".into(),
                    context: None,
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
                Ok(Request::Get { key: "k".into() }),
            ),
            (
                Method::Get,
                vec![Param::Tree(Value::Integer(1))],
                Err(-32602),
            ),
            (
                Method::GetVersions,
                vec![text("k")],
                Ok(Request::GetVersions { key: "k".into() }),
            ),
            (
                Method::Delete,
                vec![text("k")],
                Ok(Request::Delete {
                    key: "k".into(),
                    context: None,
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
}
