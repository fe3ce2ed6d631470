//! The `sepdist` command line: clap definitions and subcommands.
