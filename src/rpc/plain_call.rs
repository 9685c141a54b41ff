//! A fast reader for the calls clients send most: every parameter a plain string.
//!
//! The profile of a storage node serving `put` showed dxr's parse, which runs serde over
//! quick-xml's deserializer, at 16% of the node's CPU for a 307-byte body; the balancer pays
//! it on every request too. `put(key, value)`, `get(key)` and `delete(key)` from Python carry
//! only `<value><string>…</string></value>` parameters, and those need no serde: one pass over
//! quick-xml's events reads them.
//!
//! The reader only answers for documents it reads exactly as dxr does, and `None` for anything
//! else, which then goes to dxr: another type, attributes, comments, an entity or a carriage
//! return in the text (dxr resolves and normalises those), text with surrounding whitespace
//! (dxr trims some of it), an empty string. So the two can never disagree; the tests check
//! that on the bodies Python writes and on random strings.

use dxr::Value;
use quick_xml::Reader;
use quick_xml::events::Event;

/// The method name and string parameters of `text`, when it is a call of that plain shape.
pub fn parse(text: &str) -> Option<(String, Vec<Value>)> {
    let mut events = Events {
        reader: Reader::from_str(text),
    };
    let mut event = events.next_tag()?;
    if let Event::Decl(declaration) = &event {
        // dxr's reader takes the XML version from here, and XML 1.1 normalises more line
        // ends in text than 1.0 does: only the plain 1.0 declaration is ours to read.
        if declaration.version().ok()?.as_ref() != "1.0" {
            return None;
        }
        event = events.next_tag()?;
    }
    events.expect_start(&event, "methodCall")?;
    let name_start = events.next_tag()?;
    events.expect_start(&name_start, "methodName")?;
    let method = events.plain_text()?;
    events.expect_end("methodName")?;
    let params_start = events.next_tag()?;
    events.expect_start(&params_start, "params")?;
    let mut params = Vec::new();
    loop {
        match events.next_tag()? {
            Event::Start(tag) if tag.name().as_ref() == "param" && no_attributes(&tag) => {}
            Event::End(tag) if tag.name().as_ref() == "params" => break,
            _ => return None,
        }
        let value_start = events.next_tag()?;
        events.expect_start(&value_start, "value")?;
        // Nothing, not even whitespace, between `<value>` and `<string>`.
        let string_start = events.next()?;
        events.expect_start(&string_start, "string")?;
        params.push(Value::String(events.plain_text()?));
        events.expect_end("string")?;
        match events.next()? {
            Event::End(tag) if tag.name().as_ref() == "value" => {}
            _ => return None,
        }
        events.expect_end_tag("param")?;
    }
    events.expect_end_tag("methodCall")?;
    match events.next_tag()? {
        Event::Eof => Some((method, params)),
        _ => None,
    }
}

struct Events<'a> {
    reader: Reader<&'a [u8]>,
}

impl<'a> Events<'a> {
    fn next(&mut self) -> Option<Event<'a>> {
        self.reader.read_event().ok()
    }

    /// The next event that is not whitespace between tags.
    fn next_tag(&mut self) -> Option<Event<'a>> {
        loop {
            match self.next()? {
                Event::Text(text) if text.bytes().all(is_xml_space) => {}
                event => return Some(event),
            }
        }
    }

    fn expect_start(&self, event: &Event<'a>, name: &str) -> Option<()> {
        match event {
            Event::Start(tag) if tag.name().as_ref() == name && no_attributes(tag) => Some(()),
            _ => None,
        }
    }

    fn expect_end(&mut self, name: &str) -> Option<()> {
        match self.next()? {
            Event::End(tag) if tag.name().as_ref() == name => Some(()),
            _ => None,
        }
    }

    fn expect_end_tag(&mut self, name: &str) -> Option<()> {
        match self.next_tag()? {
            Event::End(tag) if tag.name().as_ref() == name => Some(()),
            _ => None,
        }
    }

    /// One text event that means exactly its bytes: not empty, no entity (those come as
    /// separate events), no carriage return, no whitespace at either end.
    fn plain_text(&mut self) -> Option<String> {
        let Event::Text(text) = self.next()? else {
            return None;
        };
        let content: &str = &text;
        let bytes = content.as_bytes();
        // Any ASCII whitespace (form feed included) at an edge goes to dxr, which trims XML's.
        let plain = match (bytes.first(), bytes.last()) {
            (Some(first), Some(last)) => {
                !first.is_ascii_whitespace()
                    && !last.is_ascii_whitespace()
                    && !bytes.contains(&b'\r')
            }
            _ => false,
        };
        if !plain {
            return None;
        }
        Some(content.to_owned())
    }
}

/// XML's whitespace between tags: space, tab, carriage return, line feed.
fn is_xml_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | b'\n')
}

fn no_attributes(tag: &quick_xml::events::BytesStart<'_>) -> bool {
    tag.attributes().next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What Python's `xmlrpc.client.dumps((key, value), 'put')` writes.
    fn python_call(method: &str, params: &[&str]) -> String {
        let mut body = format!(
            "<?xml version='1.0'?>\n<methodCall>\n<methodName>{method}</methodName>\n<params>\n"
        );
        for param in params {
            let escaped = param
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;");
            body.push_str(&format!(
                "<param>\n<value><string>{escaped}</string></value>\n</param>\n"
            ));
        }
        body.push_str("</params>\n</methodCall>\n");
        body
    }

    fn by_dxr(text: &str) -> Option<(String, Vec<Value>)> {
        let call = dxr::MethodCall::from_xml(text).ok()?;
        Some((call.name.into_owned(), call.params))
    }

    #[test]
    fn reads_the_calls_python_writes() {
        let body = python_call("put", &["john", "novatnack"]);
        let expected = (
            "put".to_owned(),
            vec![
                Value::String("john".into()),
                Value::String("novatnack".into()),
            ],
        );
        assert_eq!(parse(&body), Some(expected.clone()));
        assert_eq!(by_dxr(&body), Some(expected));
        let get = python_call("get", &["john"]);
        assert_eq!(parse(&get), by_dxr(&get));
    }

    #[test]
    fn leaves_everything_else_to_dxr() {
        let cases = [
            python_call("put", &["a&b", "v"]),
            python_call("put", &[" padded", "v"]),
            python_call("put", &["", "v"]),
            python_call("put", &["line\r\nbreak", "v"]),
            "<methodCall><methodName>put</methodName><params><param><value><int>1</int></value></param></params></methodCall>".to_owned(),
            "<methodCall><methodName>put</methodName><params><param><value>untyped</value></param></params></methodCall>".to_owned(),
            "<methodCall><methodName>stats</methodName><params/></methodCall>".to_owned(),
            "<methodCall><methodName>get</methodName><params><param><value><string>k</string></value></param></params></methodCall><extra/>".to_owned(),
            "<methodCall a='1'><methodName>get</methodName><params></params></methodCall>".to_owned(),
            "<methodCall><!-- c --><methodName>get</methodName><params></params></methodCall>".to_owned(),
            "<methodCall><methodName>get</methodName><params><param><value><string>k</string></value></param>".to_owned(),
            // XML 1.1 turns U+2028 in text into a line feed; other versions are errors.
            python_call("get", &["a\u{2028}b"]).replace("version='1.0'", "version='1.1'"),
            python_call("get", &["k"]).replace("version='1.0'", "version='2.0'"),
            python_call("get", &["k"]).replace("<params>\n<param>", "<params>\u{c}<param>"),
        ];
        for case in &cases {
            assert_eq!(parse(case), None, "{case}");
        }
    }

    proptest! {
        /// Whenever the fast reader answers, dxr reads the same call.
        #[test]
        fn agrees_with_dxr(
            method in "[a-z_.]{1,12}",
            params in proptest::collection::vec("\\PC{0,24}|[ \\t\\r\\n\u{85}\u{2028}<>&;#a-z0-9]{0,12}", 0..4),
            version in "1\\.[01]",
        ) {
            let refs: Vec<&str> = params.iter().map(String::as_str).collect();
            let body = python_call(&method, &refs).replace("version='1.0'", &format!("version='{version}'"));
            if let Some(fast) = parse(&body) {
                prop_assert_eq!(Some(fast), by_dxr(&body));
            }
        }

        /// Plain strings, the common case, do take the fast path.
        #[test]
        fn takes_plain_strings(key in "[a-zA-Z0-9_-][a-zA-Z0-9 _.-]{0,30}[a-zA-Z0-9]") {
            let body = python_call("get", &[&key]);
            prop_assert_eq!(parse(&body), Some(("get".to_owned(), vec![Value::String(key)])));
        }
    }
}
