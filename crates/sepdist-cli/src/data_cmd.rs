use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum DataCommand {}

pub fn run(cmd: DataCommand) -> Result<u8, crate::Failure> {
    match cmd {}
}
