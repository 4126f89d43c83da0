//! A setting given as a typed value or as one of Lightning's strings.

use crate::FabricError;
use std::str::FromStr;

/// A configuration value as the user wrote it: a typed value (`Accelerator::Cpu`, `2`) or a
/// Lightning string (`"cpu"`, `"0,2"`). It is parsed when the Fabric is built, so a bad string
/// becomes a [`FabricError`] there, never a panic here.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting<T> {
    /// Already typed.
    Value(T),
    /// Text still to be parsed with `T::from_str`.
    Text(String),
}

impl<T: FromStr<Err = FabricError>> Setting<T> {
    /// Parses the text form, or returns the typed value.
    pub fn resolve(self) -> Result<T, FabricError> {
        match self {
            Setting::Value(value) => Ok(value),
            Setting::Text(text) => text.parse(),
        }
    }
}

/// Implements `From<T>`, `From<&str>` and `From<String>` for `Setting<T>`.
macro_rules! setting_from {
    ($($ty:ty),*) => {$(
        impl From<$ty> for $crate::config::Setting<$ty> {
            fn from(value: $ty) -> Self { $crate::config::Setting::Value(value) }
        }
        impl From<&str> for $crate::config::Setting<$ty> {
            fn from(text: &str) -> Self { $crate::config::Setting::Text(text.to_string()) }
        }
        impl From<String> for $crate::config::Setting<$ty> {
            fn from(text: String) -> Self { $crate::config::Setting::Text(text) }
        }
    )*};
}
pub(crate) use setting_from;

/// Builds the "valid values" list of an error message.
pub(crate) fn list(values: &[&str]) -> String {
    values
        .iter()
        .map(|v| format!("`{v}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
