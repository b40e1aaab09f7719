//! A format-neutral document tree with optional byte spans, built from TOML or JSON, so that
//! one schema walker gives the same messages for both formats.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A value with the byte range it came from (TOML only; JSON has no spans).
#[derive(Debug)]
pub(crate) struct Node {
    pub value: Value,
    pub span: Option<Range<usize>>,
}

/// One key of a table, with the span of the key itself.
#[derive(Debug)]
pub(crate) struct Entry {
    pub key: String,
    pub key_span: Option<Range<usize>>,
    pub node: Node,
}

#[derive(Debug)]
pub(crate) enum Value {
    Str(String),
    /// Saturated at the `i128` bounds, which are out of every accepted range anyway.
    Int(i128),
    /// Kept as text, only ever shown in messages.
    Float(String),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    /// Entries in source order (TOML) or key order (JSON).
    Table(Vec<Entry>),
    /// JSON `null`; treated as absent for optional fields.
    Null,
}

impl Value {
    /// How the value reads in a message: `a string "two"`, `an integer 3`, `an array`.
    pub fn describe(&self) -> String {
        match self {
            Value::Str(s) => format!("a string {s:?}"),
            Value::Int(i) => format!("an integer {i}"),
            Value::Float(f) => format!("a float {f}"),
            Value::Bool(b) => format!("a boolean {b}"),
            Value::Datetime(d) => format!("a datetime {d}"),
            Value::Array(_) => "an array".to_owned(),
            Value::Table(_) => "a table".to_owned(),
            Value::Null => "null".to_owned(),
        }
    }
}

impl Node {
    /// Converts a parsed TOML document.
    pub fn from_toml(doc: Spanned<DeTable<'_>>) -> Node {
        let span = doc.span();
        Node {
            value: toml_table(doc.into_inner()),
            span: Some(span),
        }
    }

    /// Converts a parsed JSON document.
    pub fn from_json(value: serde_json::Value) -> Node {
        use serde_json::Value as J;
        let value = match value {
            J::Null => Value::Null,
            J::Bool(b) => Value::Bool(b),
            J::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Value::Int(i.into())
                } else if let Some(u) = n.as_u64() {
                    Value::Int(u.into())
                } else {
                    Value::Float(n.to_string())
                }
            }
            J::String(s) => Value::Str(s),
            J::Array(items) => Value::Array(items.into_iter().map(Node::from_json).collect()),
            J::Object(map) => Value::Table(
                map.into_iter()
                    .map(|(key, v)| Entry {
                        key,
                        key_span: None,
                        node: Node::from_json(v),
                    })
                    .collect(),
            ),
        };
        Node { value, span: None }
    }
}

fn toml_node(v: Spanned<DeValue<'_>>) -> Node {
    let span = v.span();
    let value = match v.into_inner() {
        DeValue::String(s) => Value::Str(s.into_owned()),
        DeValue::Integer(i) => Value::Int(i128::from_str_radix(i.as_str(), i.radix()).unwrap_or(
            if i.as_str().starts_with('-') {
                i128::MIN
            } else {
                i128::MAX
            },
        )),
        DeValue::Float(f) => Value::Float(f.as_str().to_owned()),
        DeValue::Boolean(b) => Value::Bool(b),
        DeValue::Datetime(d) => Value::Datetime(d.to_string()),
        DeValue::Array(items) => Value::Array(items.into_iter().map(toml_node).collect()),
        DeValue::Table(t) => toml_table(t),
    };
    Node {
        value,
        span: Some(span),
    }
}

fn toml_table(table: DeTable<'_>) -> Value {
    let mut entries: Vec<Entry> = table
        .into_iter()
        .map(|(k, v)| {
            let key_span = k.span();
            Entry {
                key: k.into_inner().into_owned(),
                key_span: Some(key_span),
                node: toml_node(v),
            }
        })
        .collect();
    // The parser's map is sorted by key; report mistakes in the order the user wrote them.
    entries.sort_by_key(|e| e.key_span.as_ref().map_or(0, |s| s.start));
    Value::Table(entries)
}

/// A JSON document read like `serde_json::Value`, except that an object repeating a key is an
/// error naming the key (`serde_json::Value` keeps the last silently; TOML refuses it, and so do
/// we, so that both formats accept the same documents).
pub(crate) struct StrictJson(pub serde_json::Value);

impl<'de> serde::Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictJson)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(b.into())
    }
    fn visit_i64<E>(self, i: i64) -> Result<Self::Value, E> {
        Ok(i.into())
    }
    fn visit_u64<E>(self, u: u64) -> Result<Self::Value, E> {
        Ok(u.into())
    }
    fn visit_f64<E>(self, f: f64) -> Result<Self::Value, E> {
        Ok(f.into())
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(s.into())
    }
    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(s.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictJson(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(serde_json::Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key `{key}`"
                )));
            }
            let StrictJson(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
    }
}
