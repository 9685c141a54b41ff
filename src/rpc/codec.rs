//! XML-RPC bodies: reading calls, writing responses and faults.
//!
//! Calls are read by one of three readers, first match wins:
//!
//! 1. `plain_call.rs`, a fast reader for calls whose parameters are all plain strings (most of
//!    them: `put(key, value)`, `get(key)` from Python);
//! 2. `codec/reader.rs`, our own reader of every other call written in XML-RPC's own elements.
//!    It reads a `put`'s value without building a tree, so values nest as deep as the body
//!    size limit allows, and hands it on as the XML text dxr would have written for it;
//! 3. dxr, for XML the other two do not model (attributes, namespaces, a DTD, elements
//!    XML-RPC does not have). dxr parses with serde, which recurses per element, so the body's
//!    nesting is bounded first by a non-recursive scan (a 32 MiB body of nested arrays would
//!    otherwise overflow the stack).
//!
//! All three read what dxr reads, the same way; the tests hold them side by side. Parse
//! errors never carry the input: dxr's, which do, are replaced by a short message of our own.
//!
//! Responses are written around values that are already XML text. Stored values travel as the
//! `<value>…</value>` text they were stored as, so a `get` splices them into the response
//! without parsing them again.

use dxr::{MethodCall, Value};

use crate::error::{Error, Result};

mod reader;

pub use reader::MAX_TREE_DEPTH;

/// Elements around and inside the nested levels: `methodCall/params/param` above, the
/// innermost `value` and its type element below.
const CALL_ELEMENT_OVERHEAD: usize = 5;
/// Each level of value nesting costs three elements: `value/array/data` or `value/struct/member`.
const ELEMENTS_PER_VALUE_LEVEL: usize = 3;

/// A parsed method call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: String,
    pub params: Vec<Param>,
}

/// One parameter of a call, as the daemons read it.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    /// A value read as a tree (keys, contexts, internal messages), at most
    /// [`MAX_TREE_DEPTH`] levels deep.
    Tree(Value),
    /// A `put`'s value, as the XML text the replicas store and `get` answers: it is never
    /// needed as a tree, and may nest as deep as the body allows.
    Text(String),
    /// `system.multicall`'s calls, each `None` where the entry is not a
    /// `{methodName, params}` struct.
    Calls(Vec<Option<Call>>),
}

impl Param {
    /// The tree, for a parameter read as one.
    pub fn tree(&self) -> Option<&Value> {
        match self {
            Param::Tree(value) => Some(value),
            _ => None,
        }
    }

    /// The XML text `put` stores for this parameter.
    pub fn into_value_xml(self) -> Result<String> {
        match self {
            Param::Text(xml) => Ok(xml),
            Param::Tree(value) => value_to_xml(&value),
            Param::Calls(_) => Err(Error::invalid("a list of calls is not a value")),
        }
    }
}

/// `system.multicall`'s calls from its parameters: as the reader found them, or from the tree
/// dxr read, with the rules of dxr's `from_multicall_params` (one array of structs with
/// exactly a `methodName` string and a `params` array).
pub fn multicall_calls(params: Vec<Param>) -> Result<Vec<Option<Call>>> {
    let refused = || Error::invalid("system.multicall takes one array of {methodName, params}");
    let mut params = params;
    match (params.pop(), params.is_empty()) {
        (Some(Param::Calls(calls)), true) => Ok(calls),
        (Some(Param::Tree(tree)), true) => {
            let calls = dxr::multicall::from_multicall_params(vec![tree]).map_err(|_| refused())?;
            Ok(calls
                .into_iter()
                .map(|call| {
                    call.ok().map(|(method, params)| Call {
                        method,
                        params: params.into_iter().map(Param::Tree).collect(),
                    })
                })
                .collect())
        }
        _ => Err(refused()),
    }
}

/// Reads an XML-RPC method call from an HTTP body.
///
/// A `put`'s value comes out as its XML text ([`Param::Text`]) whenever our readers read the
/// call; every other parameter as a tree.
pub fn parse_call(body: &[u8]) -> Result<Call> {
    let text =
        std::str::from_utf8(body).map_err(|_| Error::Parse("body is not UTF-8 text".into()))?;
    if let Some((method, params)) = super::plain_call::parse(text) {
        let params = params.into_iter().map(Param::Tree).collect();
        return Ok(Call { method, params });
    }
    if let reader::Reading::Read(call) = reader::read_call(text) {
        return call;
    }
    check_nesting(text)?;
    let call = MethodCall::from_xml(text)
        .map_err(|_| Error::Parse("body is not a well-formed XML-RPC method call".into()))?;
    Ok(Call {
        method: call.name.into_owned(),
        params: call.params.into_iter().map(Param::Tree).collect(),
    })
}

/// Refuses documents nested deeper than dxr can read, without building anything: about
/// [`MAX_TREE_DEPTH`] levels of arrays and structs.
///
/// It walks the tags: comments, CDATA, processing instructions and declarations are skipped
/// so that text hidden in them cannot unbalance the count.
fn check_nesting(text: &str) -> Result<()> {
    let max_elements = CALL_ELEMENT_OVERHEAD + ELEMENTS_PER_VALUE_LEVEL * MAX_TREE_DEPTH;
    let bytes = text.as_bytes();
    let mut depth: usize = 0;
    let mut i = 0;
    while let Some(offset) = memchr(b'<', &bytes[i..]) {
        let start = i + offset;
        let rest = &bytes[start..];
        let skip_to = |terminator: &[u8]| -> Result<usize> {
            find(rest, terminator)
                .map(|end| start + end + terminator.len())
                .ok_or_else(|| Error::Parse("body is not well-formed XML".into()))
        };
        if rest.starts_with(b"<!--") {
            i = skip_to(b"-->")?;
        } else if rest.starts_with(b"<![CDATA[") {
            i = skip_to(b"]]>")?;
        } else if rest.starts_with(b"<?") {
            i = skip_to(b"?>")?;
        } else if rest.starts_with(b"<!") {
            i = skip_to(b">")?;
        } else {
            let end = skip_to(b">")?;
            let tag = &bytes[start..end];
            if tag.starts_with(b"</") {
                depth = depth.saturating_sub(1);
            } else if !tag.ends_with(b"/>") {
                depth += 1;
                if depth > max_elements {
                    return Err(Error::invalid(format!(
                        "value nested deeper than {MAX_TREE_DEPTH} levels in XML beyond \
                         XML-RPC's own elements (attributes, namespaces, a DTD or unknown elements)"
                    )));
                }
            }
            i = end;
        }
    }
    Ok(())
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The XML text of a value, as stored and as spliced into responses.
pub fn value_to_xml(value: &Value) -> Result<String> {
    // Strings, nearly every value, are written directly rather than through dxr's serde.
    if let Value::String(text) = value {
        return Ok(string_xml(text));
    }
    value
        .to_xml()
        .map_err(|_| Error::Internal("value could not be encoded".into()))
}

/// Reads back a value written by [`value_to_xml`].
pub fn value_from_xml(xml: &str) -> Result<Value> {
    Value::from_xml(xml).map_err(|_| Error::Internal("stored value could not be decoded".into()))
}

/// An integer as `i4` when it fits, else as the `i8` extension (which Python's client reads),
/// so counters never saturate.
pub fn int_value(n: i64) -> Value {
    i32::try_from(n).map_or(Value::Long(n), Value::Integer)
}

/// `<value><nil/></value>`: what `get` returns for a key with no value.
pub const NIL_XML: &str = "<value><nil/></value>";

/// The XML text of a string value.
pub fn string_xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 32);
    out.push_str("<value><string>");
    escape_into(&mut out, text);
    out.push_str("</string></value>");
    out
}

fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

/// A successful response around one value's XML text.
pub fn response_xml(value_xml: &str) -> String {
    let mut out = String::with_capacity(value_xml.len() + 96);
    out.push_str("<?xml version=\"1.0\"?><methodResponse><params><param>");
    out.push_str(value_xml);
    out.push_str("</param></params></methodResponse>");
    out
}

/// The struct `{faultCode, faultString}` as a value's XML text (also used inside multicall).
pub fn fault_struct_xml(code: i32, message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 160);
    out.push_str("<value><struct><member><name>faultCode</name><value><int>");
    out.push_str(&code.to_string());
    out.push_str("</int></value></member><member><name>faultString</name><value><string>");
    escape_into(&mut out, message);
    out.push_str("</string></value></member></struct></value>");
    out
}

/// A fault response.
pub fn fault_xml(error: &Error) -> String {
    let value = fault_struct_xml(error.fault_code(), &error.fault_string());
    format!("<?xml version=\"1.0\"?><methodResponse><fault>{value}</fault></methodResponse>")
}

/// An array of values' XML texts, as one value's XML text.
pub fn array_xml<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::from("<value><array><data>");
    for item in items {
        out.push_str(item);
    }
    out.push_str("</data></array></value>");
    out
}

/// A struct of named values' XML texts, as one value's XML text.
pub fn struct_xml(members: &[(&str, &str)]) -> String {
    let mut out = String::from("<value><struct>");
    for (name, value_xml) in members {
        out.push_str("<member><name>");
        escape_into(&mut out, name);
        out.push_str("</name>");
        out.push_str(value_xml);
        out.push_str("</member>");
    }
    out.push_str("</struct></value>");
    out
}

/// A response body from another daemon: the value, or the fault it carried.
pub fn parse_response(body: &str) -> std::result::Result<Value, (i32, String)> {
    if let Ok(response) = dxr::MethodResponse::from_xml(body) {
        return Ok(response.value);
    }
    match dxr::FaultResponse::from_xml(body) {
        Ok(fault) => Err((fault.fault.code(), fault.fault.string().to_owned())),
        Err(_) => Err((crate::error::FAULT_PARSE, "response is not XML-RPC".into())),
    }
}

/// Builds a method call body.
pub fn call_xml(method: &str, params: Vec<Value>) -> Result<String> {
    MethodCall {
        name: method.into(),
        params,
    }
    .to_xml()
    .map(|body| format!("<?xml version=\"1.0\"?>{body}"))
    .map_err(|_| Error::Internal("call could not be encoded".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Python's `xmlrpc.client` sends for `put('john', 'novatnack')`.
    const PYTHON_PUT: &str = "<?xml version='1.0'?>\n<methodCall>\n<methodName>put</methodName>\n<params>\n<param>\n<value><string>john</string></value>\n</param>\n<param>\n<value><string>novatnack</string></value>\n</param>\n</params>\n</methodCall>\n";

    #[test]
    fn reads_what_python_sends() {
        let call = parse_call(PYTHON_PUT.as_bytes()).expect("python's call parses");
        assert_eq!(call.method, "put");
        assert_eq!(
            call.params,
            vec![
                Param::Tree(Value::String("john".into())),
                Param::Tree(Value::String("novatnack".into()))
            ]
        );
    }

    #[test]
    fn malformed_bodies_are_parse_errors_that_do_not_echo_the_input() {
        let marker = "SECRET-MARKER-1234";
        let bodies = [
            format!("<methodCall><methodName>{marker}"),
            format!("not xml at all {marker}"),
            format!("<methodCall><params>{marker}</params></methodCall>"),
            format!("<!-- {marker}"),
        ];
        for body in bodies {
            let error = parse_call(body.as_bytes()).expect_err(&body);
            assert_eq!(error.fault_code(), crate::error::FAULT_PARSE, "{body}");
            assert!(!error.fault_string().contains(marker));
        }
        assert!(parse_call(&[0xff, 0xfe, b'<']).is_err());
    }

    fn nested_call(depth: usize) -> String {
        let open = "<value><array><data>".repeat(depth);
        let close = "</data></array></value>".repeat(depth);
        format!(
            "<methodCall><methodName>put</methodName><params><param><value>k</value></param><param>{open}<value><int>1</int></value>{close}</param></params></methodCall>"
        )
    }

    /// The XML text `put` stores for the value of [`nested_call`].
    fn nested_text(depth: usize) -> String {
        let open = "<value><array><data>".repeat(depth);
        let close = "</data></array></value>".repeat(depth);
        format!("{open}<value><i4>1</i4></value>{close}")
    }

    fn put_value_text(body: &str) -> String {
        let mut call = parse_call(body.as_bytes()).expect("the call parses");
        assert_eq!(call.params.len(), 2);
        call.params
            .swap_remove(1)
            .into_value_xml()
            .expect("the value's text")
    }

    #[test]
    fn values_nest_past_dxrs_limit() {
        for depth in [MAX_TREE_DEPTH, MAX_TREE_DEPTH + 1, 1_000] {
            assert_eq!(
                put_value_text(&nested_call(depth)),
                nested_text(depth),
                "{depth} levels"
            );
        }
        // Hidden closing tags in CDATA or comments do not fool the reader.
        let sneaky = nested_call(MAX_TREE_DEPTH + 1).replace(
            "<data><value><int>",
            "<data><!-- </a></a></a></a> --><value><int>",
        );
        assert_eq!(put_value_text(&sneaky), nested_text(MAX_TREE_DEPTH + 1));
        // XML the reader leaves to dxr is still bounded before dxr sees it.
        let dressed = nested_call(MAX_TREE_DEPTH + 1).replace("<int>", "<int kind='x'>");
        let error = parse_call(dressed.as_bytes()).expect_err("too deep for dxr");
        assert_eq!(error.fault_code(), crate::error::FAULT_INVALID_PARAMS);
        let shallow = nested_call(MAX_TREE_DEPTH).replace("<int>", "<int kind='x'>");
        assert_eq!(put_value_text(&shallow), nested_text(MAX_TREE_DEPTH));
    }

    #[test]
    fn very_deep_nesting_is_read_without_recursion() {
        // 200,000 levels are 600,000 nested elements: far past any stack a recursive reader
        // would have (a test thread's is 2 MiB).
        let body = nested_call(200_000);
        assert_eq!(put_value_text(&body), nested_text(200_000));
        // Unclosed, or in XML left to dxr: refused, still without recursion.
        let unclosed = body.replace("</params></methodCall>", "");
        assert!(parse_call(unclosed.as_bytes()).is_err());
        let dressed = body.replace("<int>", "<int kind='x'>");
        assert!(parse_call(dressed.as_bytes()).is_err());
    }

    #[test]
    fn values_round_trip_through_their_xml_text() {
        let value = Value::Struct(
            [
                (
                    "a".to_string(),
                    Value::Array(vec![Value::Integer(-1), Value::Boolean(true)]),
                ),
                ("b <&>".to_string(), Value::String(" x\n<&>'\" ".into())),
                ("c".to_string(), Value::Base64((0..=255).collect())),
                ("d".to_string(), Value::Double(-1.5e-300)),
            ]
            .into(),
        );
        let xml = value_to_xml(&value).expect("encodes");
        assert_eq!(value_from_xml(&xml).expect("decodes"), value);
        let response = response_xml(&xml);
        assert_eq!(parse_response(&response), Ok(value));
        // Top-level strings take the direct path; they must read back the same.
        for text in ["", "plain", " x\n<&>'\" ", "line\r\nbreak", "ünï]]>"] {
            let value = Value::String(text.into());
            let xml = value_to_xml(&value).expect("encodes");
            assert_eq!(value_from_xml(&xml).expect("decodes"), value, "{xml}");
        }
    }

    #[test]
    fn faults_and_strings_are_escaped() {
        let error = Error::invalid("bad <key> & more");
        assert_eq!(
            parse_response(&fault_xml(&error)),
            Err((-32602, "invalid params: bad <key> & more".into()))
        );
        let xml = string_xml("a<b>&c\r\n");
        assert_eq!(
            value_from_xml(&xml).expect("decodes"),
            Value::String("a<b>&c\r\n".into())
        );
    }
}
