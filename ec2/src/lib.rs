//! The AWS EC2 provider (being written).
pub use aws_sdk_ec2;
