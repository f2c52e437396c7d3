//! Validated names: agent names, versions, hostnames and BootAgent serials as types that
//! can only be made by passing the rules of [`crate::validate`].
//!
//! A value of one of these types is proof that the name was checked: it is safe as a path
//! part, a map key and a log field. They deserialize through the same check (a bad name in
//! a JSON body fails with the rule's message) and have no way in that skips it: no
//! `From<String>`, no `Default`, no mutable access.
//!
//! They hold a `Box<str>`: a name never changes once checked, so the spare capacity of a
//! `String` is of no use, and the box is two words instead of three. Names are short
//! (at most 255 bytes), so a clone is one small copy; an `Arc<str>` would make clones
//! cheaper but adds a reference count to every name, and the hot paths that hold many
//! names (the fleet store) intern them anyway.

use std::borrow::Borrow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize, Serializer};

use crate::validate::{validate_agent_name, validate_hostname, validate_version, NameError};

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(Box<str>);

        impl $name {
            /// Checks `s` and makes the name of it.
            pub fn parse(s: &str) -> Result<Self, NameError> {
                $check(s)?;
                Ok($name(s.into()))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&str> for $name {
            type Error = NameError;
            fn try_from(s: &str) -> Result<Self, NameError> {
                $name::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                $check(&s)?;
                Ok($name(s.into_boxed_str()))
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $name::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0.into_string()
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Maps and sets keyed by the name can be looked up by `&str`: `Hash`, `Eq` and
        /// `Ord` are those of the text.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                *self.0 == **other
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == &*other.0
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                **self == *other.0
            }
        }
    };
}

name_type!(
    /// An agent name: 1–128 bytes of `[A-Za-z0-9._-]`, not starting with `.`
    /// ([`validate_agent_name`]). It names the agent's folder on every host.
    AgentName,
    validate_agent_name
);

name_type!(
    /// A version: 1–128 bytes of `[A-Za-z0-9._+-]`, not starting with `.`
    /// ([`validate_version`]). It names a version folder on every host. Versions are only
    /// compared as text: nothing here knows which of two versions is newer.
    Version,
    validate_version
);

name_type!(
    /// A hostname: 1–255 bytes of `[A-Za-z0-9._-]`, not starting with `.`
    /// ([`validate_hostname`]).
    Hostname,
    validate_hostname
);

name_type!(
    /// A BootAgent serial (`agentsn`): 1–64 bytes of ASCII letters, digits and `-`, a UUID
    /// fits ([`crate::bootagent::validate_agentsn`]).
    Serial,
    crate::bootagent::validate_agentsn
);

/// The reserved agent name of ops-updater itself: a desired agent (or a BootAgent job) of
/// this name is the updater's own version, and a report carries the updater's version
/// under it. Its artifact is `ops-updater-<version>.tar.gz`.
pub const SELF_AGENT: &str = "ops-updater";

/// The tarball file of an agent version: `{name}-{version}.tar.gz` (the original rule,
/// [`crate::legacy::tarball_file`]).
pub fn tarball_file(name: &AgentName, version: &Version) -> String {
    crate::legacy::tarball_file(name.as_str(), version.as_str())
}

/// The tarball URL of an agent version under `base` (the original rule: exactly one `/`
/// between the base and [`tarball_file`]).
pub fn tarball_url(base: &str, name: &AgentName, version: &Version) -> String {
    crate::legacy::join_url(base, &tarball_file(name, version))
}

/// The `.md5` URL of an agent version under `base` (the tarball's URL plus `.md5`, on
/// whatever base serves the checksums).
pub fn md5_url(base: &str, name: &AgentName, version: &Version) -> String {
    format!("{}.md5", tarball_url(base, name, version))
}

/// The folder of an agent in a workdir: `<workdir>/<name>`. Only joins; does no IO.
pub fn agent_dir(workdir: &Path, name: &AgentName) -> PathBuf {
    workdir.join(name.as_str())
}

/// The folder of an agent version in a workdir: `<workdir>/<name>/<version>`. Only joins;
/// does no IO.
pub fn version_dir(workdir: &Path, name: &AgentName, version: &Version) -> PathBuf {
    agent_dir(workdir, name).join(version.as_str())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    /// Inputs every constructor of every name type refuses.
    fn refused_by_all() -> Vec<String> {
        vec![
            String::new(),
            "..".into(),
            ".".into(),
            ".hidden".into(),
            "../etc".into(),
            "a/b".into(),
            "/abs".into(),
            "a\0b".into(),
            "a\nb".into(),
            "a\rb".into(),
            "a\tb".into(),
            "a\u{7f}b".into(),
            "a b".into(),
            "ä".into(),
            "a".repeat(256),
        ]
    }

    /// Runs every constructor of `T` on `input` and checks they agree with `want_ok`.
    fn check_constructors<T>(input: &str, want_ok: bool)
    where
        T: FromStr<Err = NameError>
            + for<'a> TryFrom<&'a str, Error = NameError>
            + TryFrom<String, Error = NameError>
            + serde::de::DeserializeOwned
            + fmt::Debug
            + AsRef<str>,
    {
        let from_str = input.parse::<T>();
        let try_str = T::try_from(input);
        let try_string = T::try_from(input.to_string());
        let json = serde_json::to_string(input).unwrap();
        let de = serde_json::from_str::<T>(&json);
        assert_eq!(from_str.is_ok(), want_ok, "{input:?} parse: {from_str:?}");
        assert_eq!(
            try_str.is_ok(),
            want_ok,
            "{input:?} try_from(&str): {try_str:?}"
        );
        assert_eq!(
            try_string.is_ok(),
            want_ok,
            "{input:?} try_from(String): {try_string:?}"
        );
        assert_eq!(de.is_ok(), want_ok, "{input:?} deserialize: {de:?}");
        if let Ok(v) = from_str {
            assert_eq!(v.as_ref(), input);
        }
    }

    #[test]
    fn every_constructor_refuses_hostile_names() {
        for bad in refused_by_all() {
            check_constructors::<AgentName>(&bad, false);
            check_constructors::<Version>(&bad, false);
            check_constructors::<Hostname>(&bad, false);
            check_constructors::<Serial>(&bad, false);
        }
    }

    #[test]
    fn each_type_takes_what_its_rule_takes() {
        // (input, agent name, version, hostname, serial)
        let cases: &[(&str, bool, bool, bool, bool)] = &[
            ("falcon-agent", true, true, true, true),
            ("web01.dc1.example", true, true, true, false),
            ("A_b.c-9", true, true, true, false),
            ("1.0.0+build.5", false, true, false, false),
            (
                "bfdcc18c-b6b9-4725-9c47-37fd93dba5b6",
                true,
                true,
                true,
                true,
            ),
            ("x..y", true, true, true, false),
            (&"a".repeat(64), true, true, true, true),
            (&"a".repeat(65), true, true, true, false),
            (&"a".repeat(128), true, true, true, false),
            (&"a".repeat(129), false, false, true, false),
            (&"a".repeat(255), false, false, true, false),
        ];
        for &(input, agent, version, host, serial) in cases {
            check_constructors::<AgentName>(input, agent);
            check_constructors::<Version>(input, version);
            check_constructors::<Hostname>(input, host);
            check_constructors::<Serial>(input, serial);
        }
    }

    #[test]
    fn serde_round_trips_as_a_plain_string() {
        let n = AgentName::parse("falcon-agent").unwrap();
        let text = serde_json::to_string(&n).unwrap();
        assert_eq!(text, r#""falcon-agent""#);
        assert_eq!(serde_json::from_str::<AgentName>(&text).unwrap(), n);
        let m: BTreeMap<Hostname, Version> =
            serde_json::from_str(r#"{"web-01":"1.0.0+b1","db-01":"2"}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"db-01":"2","web-01":"1.0.0+b1"}"#
        );
    }

    #[test]
    fn deserializing_a_bad_name_fails_with_the_rules_message() {
        let e = serde_json::from_str::<AgentName>(r#""../etc""#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(r#"invalid agent name "../etc": starts with '.'"#),
            "{e}"
        );
        let e = serde_json::from_str::<Version>(r#""1 0""#).unwrap_err();
        assert!(e.to_string().starts_with("invalid version"), "{e}");
        let e = serde_json::from_str::<Hostname>(r#""""#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(r#"invalid hostname "": is empty"#),
            "{e}"
        );
        let e = serde_json::from_str::<Serial>(r#""a/b""#).unwrap_err();
        assert!(e.to_string().starts_with("invalid agentsn"), "{e}");
        // Not a string at all: serde's own message.
        assert!(serde_json::from_str::<AgentName>("1").is_err());
    }

    #[test]
    fn maps_keyed_by_names_are_looked_up_by_str() {
        let mut h = HashMap::new();
        h.insert(Hostname::parse("web-01").unwrap(), 1);
        assert_eq!(h.get("web-01"), Some(&1));
        assert_eq!(h.get("web-02"), None);
        let mut b = BTreeMap::new();
        b.insert(Serial::parse("sn-1").unwrap(), 2);
        assert_eq!(b.get("sn-1"), Some(&2));
    }

    #[test]
    fn names_compare_with_text_and_order_as_text() {
        let a = Version::parse("1.10").unwrap();
        let b = Version::parse("1.9").unwrap();
        // String order, not version order.
        assert!(a < b);
        assert_eq!(a, "1.10");
        assert_eq!(a, *"1.10");
        assert_eq!(a, "1.10".to_string());
        assert_eq!(*"1.10", a);
        assert_eq!(a.to_string(), "1.10");
        assert_eq!(format!("{a:?}"), r#""1.10""#);
        assert_eq!(String::from(a), "1.10");
    }

    #[test]
    fn paths_are_built_from_names() {
        let n = AgentName::parse("falcon-agent").unwrap();
        let v = Version::parse("1.0.1").unwrap();
        assert_eq!(tarball_file(&n, &v), "falcon-agent-1.0.1.tar.gz");
        assert_eq!(
            version_dir(Path::new("/w"), &n, &v),
            Path::new("/w/falcon-agent/1.0.1")
        );
        assert_eq!(agent_dir(Path::new("w"), &n), Path::new("w/falcon-agent"));
    }
}
