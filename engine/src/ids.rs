//! Validated identifiers: [`DriverId`], [`OrderId`], [`RegionId`].

use std::fmt;
use std::str::FromStr;

use compact_str::CompactString;

use crate::error::{Error, Result};

/// The longest id accepted, in bytes (ids are ASCII, so also in characters).
pub const MAX_ID_LEN: usize = 64;

fn validate(kind: &str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(Error::InvalidId(format!("{kind} must not be empty")));
    }
    if s.len() > MAX_ID_LEN {
        return Err(Error::InvalidId(format!(
            "{kind} is {} characters long, at most {MAX_ID_LEN} allowed",
            s.len()
        )));
    }
    if let Some(bad) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(Error::InvalidId(format!(
            "{kind} contains {bad:?}; allowed are A-Z a-z 0-9 _ . : -"
        )));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        ///
        /// 1–64 characters from `[A-Za-z0-9_.:-]`; stored inline (no heap
        /// allocation) up to 24 bytes.
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(CompactString);

        impl $name {
            /// Validates and wraps an id.
            ///
            /// # Errors
            /// [`Error::InvalidId`] when the id is empty, longer than 64
            /// characters or contains a character outside `[A-Za-z0-9_.:-]`.
            pub fn new(s: &str) -> Result<Self> {
                validate($kind, s)?;
                Ok(Self(CompactString::new(s)))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                Self::new(&s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0.as_str())
            }
        }
    };
}

id_type!(
    /// A driver's id, chosen by the client.
    DriverId,
    "driver_id"
);
id_type!(
    /// An order's id, chosen by the client; the idempotency key of a match.
    OrderId,
    "order_id"
);
id_type!(
    /// A region's id (for example `chicago-loop` or `nyc-1`).
    RegionId,
    "region"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "drv-1", "A_b.c:d-9", &"x".repeat(64), "367466930"] {
            assert_eq!(DriverId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        let long = "x".repeat(65);
        for bad in ["", long.as_str(), "a b", "a/b", "é", "a\0", "a\n", "{}"] {
            let err = DriverId::new(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_id", "{bad:?}");
        }
        assert!(OrderId::from_str("o#1").is_err());
        assert!(RegionId::try_from(String::new()).is_err());
    }

    #[test]
    fn error_names_the_kind_and_the_character() {
        let msg = OrderId::new("a b").unwrap_err().to_string();
        assert!(msg.contains("order_id") && msg.contains("' '"), "{msg}");
    }
}
