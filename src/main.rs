//! The `portcullis` binary: parse the command line, run the command.

#[global_allocator]
static GLOBAL: portcullis::allocator::Mimalloc = portcullis::allocator::Mimalloc;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    portcullis::cmd::dispatch(portcullis::cli::Cli::parse())
}
