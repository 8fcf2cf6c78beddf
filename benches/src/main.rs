//! NovaCron benchmark harness (the fleet simulator lands here).
fn main() {}
