//! `graylane render <target>`: configuration for a router that runs graylane, printed for the
//! operator to install (nginx today). Pure text generation: nothing is contacted.

pub mod nginx;

use clap::Subcommand;

/// What `graylane render` can produce.
#[derive(Debug, Subcommand)]
pub enum Target {
    /// An nginx include file (http context): graylane's Lua glue, one upstream and one server
    /// per service.
    Nginx(Box<nginx::Args>),
}

/// Renders `target`.
pub fn run(target: &Target) -> Result<String, nginx::Error> {
    match target {
        Target::Nginx(args) => nginx::render(args),
    }
}
