//! Errors of the core: every one names the argument and what is wrong with it.

use std::fmt;

/// Invalid input to a core function. The message is meant for the end user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError(pub String);

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

pub type Result<T> = std::result::Result<T, InputError>;

/// Returns `Err(InputError(message))` from the enclosing function.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::InputError(format!($($arg)*)))
    };
}
pub(crate) use bail;
