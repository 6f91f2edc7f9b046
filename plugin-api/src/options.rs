//! Reading a plugin's options in the config's own RON dialect.
//!
//! The daemon reads its config with the `implicit_some` and
//! `unwrap_variant_newtypes` extensions (so `backlog: 1024` fills an `Option`);
//! plugins parsing their `options` the same way keep one dialect for admins.

use serde::de::DeserializeOwned;

/// The RON options the daemon uses for its config, for plugins to use on theirs.
pub fn ron_options() -> ron::Options {
    ron::Options::default().with_default_extension(
        ron::extensions::Extensions::IMPLICIT_SOME
            | ron::extensions::Extensions::UNWRAP_VARIANT_NEWTYPES,
    )
}

/// Parses a plugin's options text; the error names the line and column within it.
pub fn parse_options<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    ron_options().from_str(text).map_err(|e| {
        format!(
            "options {}:{}: {}",
            e.span.start.line, e.span.start.col, e.code
        )
    })
}
