//! demo placeholder
/// Demo arguments.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {}
/// Runs the demo.
pub async fn run(_: DemoArgs) -> anyhow::Result<()> { Ok(()) }
