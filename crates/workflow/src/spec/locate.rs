//! Finding the line of a node (`steps[2].needs[0]`) in the spec's YAML source.
//!
//! `serde_yaml` keeps no positions once a document is deserialized, but it does stamp
//! an error raised while visiting a node with that node's position. So to find a node,
//! the source is parsed again with a seed that walks down the path, skipping
//! everything else, and fails on purpose at the node: the error's location is the
//! answer. This only runs when a spec is already being refused.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    /// The `n`th (0-based) occurrence of a key that a mapping repeats.
    KeyNth(String, usize),
    Index(usize),
}

/// `steps[2].needs[0]`.
pub fn path_string(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) | Seg::KeyNth(k, _) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

const MARK: &str = "clawos-workflow-locate";

/// The 1-based line and column of the node at `path`, if the source has one there.
pub fn locate(src: &str, path: &[Seg]) -> Option<(usize, usize)> {
    let de = serde_yaml::Deserializer::from_str(src);
    match (Probe { path }).deserialize(de) {
        Err(e) if e.to_string().contains(MARK) => e.location().map(|l| (l.line(), l.column())),
        _ => None,
    }
}

struct Probe<'p> {
    path: &'p [Seg],
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.path.split_first() {
            None => d.deserialize_any(Found),
            Some((Seg::Key(k), rest)) => d.deserialize_map(InMap {
                key: k,
                nth: 0,
                rest,
            }),
            Some((Seg::KeyNth(k, n), rest)) => d.deserialize_map(InMap {
                key: k,
                nth: *n,
                rest,
            }),
            Some((Seg::Index(i), rest)) => d.deserialize_seq(InSeq { index: *i, rest }),
        }
    }
}

/// Fails on whatever node it is given, so that the error carries that node's mark.
struct Found;

impl<'de> Visitor<'de> for Found {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("anything")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(MARK))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(MARK))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(MARK))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(MARK))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(MARK))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(MARK))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(MARK))
    }
    fn visit_some<D: de::Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
        Err(de::Error::custom(MARK))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(MARK))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(MARK))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(MARK))
    }
}

struct InMap<'p> {
    key: &'p str,
    nth: usize,
    rest: &'p [Seg],
}

impl<'de> Visitor<'de> for InMap<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = 0;
        while let Some(k) = map.next_key::<KeyText>()? {
            let hit = k.0.as_deref() == Some(self.key);
            if hit && seen == self.nth {
                if self.rest.is_empty() {
                    // Point at the value: for `needs: [a]` that is the list, for
                    // `agent: x` the scalar.
                    return map.next_value_seed(Probe { path: &[] });
                }
                return map.next_value_seed(Probe { path: self.rest });
            }
            if hit {
                seen += 1;
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

/// A mapping key as text, or `None` for a key that is not a scalar.
struct KeyText(Option<String>);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_owned())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<KeyText, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(KeyText(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<KeyText, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(KeyText(None))
            }
        }
        d.deserialize_any(V)
    }
}

struct InSeq<'p> {
    index: usize,
    rest: &'p [Seg],
}

impl<'de> Visitor<'de> for InSeq<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sequence")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            if i == self.index {
                return seq.next_element_seed(Probe { path: self.rest }).map(|_| ());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SRC: &str = "\
apiVersion: clawos.dev/v1
metadata: { name: x }
steps:
  - id: a
    prompt: hi
  - id: b
    needs: [a, zz]
    prompt: |
      multi
      line
";

    fn k(s: &str) -> Seg {
        Seg::Key(s.to_owned())
    }

    #[test]
    fn finds_nodes() {
        assert_eq!(locate(SRC, &[k("apiVersion")]).map(|l| l.0), Some(1));
        assert_eq!(locate(SRC, &[k("metadata"), k("name")]), Some((2, 19)));
        assert_eq!(
            locate(SRC, &[k("steps"), Seg::Index(1)]).map(|l| l.0),
            Some(6)
        );
        assert_eq!(
            locate(SRC, &[k("steps"), Seg::Index(1), k("needs"), Seg::Index(1)]),
            Some((7, 16))
        );
        assert_eq!(
            locate(SRC, &[k("steps"), Seg::Index(1), k("prompt")]).map(|l| l.0),
            Some(8)
        );
        assert_eq!(locate(SRC, &[k("steps"), Seg::Index(5)]), None);
        assert_eq!(locate(SRC, &[k("nope")]), None);
    }

    #[test]
    fn path_strings() {
        assert_eq!(
            path_string(&[k("steps"), Seg::Index(2), k("needs"), Seg::Index(0)]),
            "steps[2].needs[0]"
        );
    }
}
