//! [`Val`]: one record's value tree, borrowing from the input buffer where it can.
//!
//! JSON lines are parsed straight into `Val<'line>` with zero-copy strings
//! (serde's borrowed-str path), which is what makes profiling a large JSONL
//! file cheap. CSV, Parquet and Arrow readers build owned `Val<'static>`s.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// A JSON-like value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    /// `null` (or a missing cell in a columnar file).
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer above `i64::MAX`.
    UInt(u64),
    /// A float.
    Float(f64),
    /// A string.
    Str(Cow<'a, str>),
    /// A list.
    List(Vec<Val<'a>>),
    /// An object with its keys in input order.
    Map(Vec<(Cow<'a, str>, Val<'a>)>),
}

impl<'a> Val<'a> {
    /// The value under `key`, when this is a map that has it.
    pub fn get(&self, key: &str) -> Option<&Val<'a>> {
        match self {
            Val::Map(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, when this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Val::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The list, when this is one.
    pub fn as_list(&self) -> Option<&[Val<'a>]> {
        match self {
            Val::List(l) => Some(l),
            _ => None,
        }
    }

    /// The key/value pairs, when this is a map.
    pub fn as_map(&self) -> Option<&[(Cow<'a, str>, Val<'a>)]> {
        match self {
            Val::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The JSON type name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Val::Null => "null",
            Val::Bool(_) => "boolean",
            Val::Int(_) | Val::UInt(_) | Val::Float(_) => "number",
            Val::Str(_) => "string",
            Val::List(_) => "array",
            Val::Map(_) => "object",
        }
    }

    /// Calls `f` on every string leaf (strings, and numbers/booleans as their text), depth first.
    pub fn for_each_text(&self, f: &mut impl FnMut(&str)) {
        match self {
            Val::Null => {}
            Val::Bool(b) => f(if *b { "True" } else { "False" }),
            Val::Int(i) => f(&i.to_string()),
            Val::UInt(u) => f(&u.to_string()),
            Val::Float(x) => f(&x.to_string()),
            Val::Str(s) => f(s),
            Val::List(l) => l.iter().for_each(|v| v.for_each_text(f)),
            Val::Map(m) => m.iter().for_each(|(_, v)| v.for_each_text(f)),
        }
    }

    /// A deep copy that owns its strings.
    pub fn into_owned(self) -> Val<'static> {
        match self {
            Val::Null => Val::Null,
            Val::Bool(b) => Val::Bool(b),
            Val::Int(i) => Val::Int(i),
            Val::UInt(u) => Val::UInt(u),
            Val::Float(x) => Val::Float(x),
            Val::Str(s) => Val::Str(Cow::Owned(s.into_owned())),
            Val::List(l) => Val::List(l.into_iter().map(Val::into_owned).collect()),
            Val::Map(m) => Val::Map(
                m.into_iter()
                    .map(|(k, v)| (Cow::Owned(k.into_owned()), v.into_owned()))
                    .collect(),
            ),
        }
    }

    /// Converts to a `serde_json::Value` (key order kept).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Val::Null => J::Null,
            Val::Bool(b) => J::Bool(*b),
            Val::Int(i) => J::from(*i),
            Val::UInt(u) => J::from(*u),
            Val::Float(x) => serde_json::Number::from_f64(*x).map_or(J::Null, J::Number),
            Val::Str(s) => J::String(s.to_string()),
            Val::List(l) => J::Array(l.iter().map(Val::to_json).collect()),
            Val::Map(m) => J::Object(
                m.iter()
                    .map(|(k, v)| (k.to_string(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// Converts from a `serde_json::Value`.
    pub fn from_json(v: &serde_json::Value) -> Val<'static> {
        use serde_json::Value as J;
        match v {
            J::Null => Val::Null,
            J::Bool(b) => Val::Bool(*b),
            J::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Val::Int(i)
                } else if let Some(u) = n.as_u64() {
                    Val::UInt(u)
                } else {
                    Val::Float(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            J::String(s) => Val::Str(Cow::Owned(s.clone())),
            J::Array(a) => Val::List(a.iter().map(Val::from_json).collect()),
            J::Object(o) => Val::Map(
                o.iter()
                    .map(|(k, v)| (Cow::Owned(k.clone()), Val::from_json(v)))
                    .collect(),
            ),
        }
    }
}

/// A string key that borrows from the input when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Val<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Val<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Val<'de>, E> {
                Ok(Val::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Val<'de>, E> {
                Ok(Val::Null)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Val<'de>, D2::Error> {
                Val::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Val<'de>, E> {
                Ok(Val::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Val<'de>, E> {
                Ok(Val::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Val<'de>, E> {
                Ok(i64::try_from(v).map_or(Val::UInt(v), Val::Int))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Val<'de>, E> {
                Ok(Val::Float(v))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Val<'de>, E> {
                Ok(Val::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Val<'de>, E> {
                Ok(Val::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Val<'de>, E> {
                Ok(Val::Str(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Val<'de>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(v) = seq.next_element::<Val<'de>>()? {
                    out.push(v);
                }
                Ok(Val::List(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Val<'de>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                    let v = map.next_value::<Val<'de>>()?;
                    out.push((k, v));
                }
                Ok(Val::Map(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Val<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Val::Null => s.serialize_unit(),
            Val::Bool(b) => s.serialize_bool(*b),
            Val::Int(i) => s.serialize_i64(*i),
            Val::UInt(u) => s.serialize_u64(*u),
            Val::Float(x) => {
                if x.is_finite() {
                    s.serialize_f64(*x)
                } else {
                    s.serialize_unit()
                }
            }
            Val::Str(v) => s.serialize_str(v),
            Val::List(l) => {
                let mut seq = s.serialize_seq(Some(l.len()))?;
                for v in l {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Val::Map(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m {
                    map.serialize_entry(k.as_ref(), v)?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_borrowed_and_round_trips() {
        let line =
            br#"{"a":"x","b":[1,-2,3.5,true,null],"c":{"d":"e\nf"},"big":18446744073709551615}"#;
        let v: Val = serde_json::from_slice(line).unwrap();
        match v.get("a") {
            Some(Val::Str(Cow::Borrowed(s))) => assert_eq!(*s, "x"),
            other => panic!("expected a borrowed string, got {other:?}"),
        }
        assert_eq!(
            v.get("c").and_then(|c| c.get("d")).and_then(Val::as_str),
            Some("e\nf")
        );
        assert_eq!(v.get("big"), Some(&Val::UInt(u64::MAX)));
        let back = serde_json::to_string(&v).unwrap();
        assert_eq!(back.as_bytes(), line);
        assert_eq!(Val::from_json(&v.to_json()), v.into_owned());
    }

    #[test]
    fn text_leaves_in_order() {
        let v: Val = serde_json::from_str(r#"{"x":"ab","y":[1,{"z":"cd"}],"n":null}"#).unwrap();
        let mut out = Vec::new();
        v.for_each_text(&mut |s| out.push(s.to_string()));
        assert_eq!(out, ["ab", "1", "cd"]);
    }
}
