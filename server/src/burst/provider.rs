//! Builds the configured provider: `[burst.aws]` → the EC2 driver.

use std::sync::Arc;

use novacron_cloud::Provider;

use crate::config::BurstConfig;

/// The provider `[burst]` configures (after validation).
pub(super) fn build(cfg: &BurstConfig) -> Result<Arc<dyn Provider>, String> {
    let Some(aws) = &cfg.aws else {
        return Err("no provider is configured: add [burst.aws]".into());
    };
    let types = cfg.instance_types().map_err(|e| e.to_string())?;
    let credentials = match (&aws.access_key_id, &aws.secret_access_key) {
        (Some(id), Some(secret)) => novacron_ec2::CredentialSource::Static(novacron_ec2::Credentials {
            access_key_id: id.clone(),
            secret_access_key: secret.0.clone(),
            session_token: aws.session_token.as_ref().map(|t| t.0.clone()),
        }),
        _ => novacron_ec2::CredentialSource::Standard {
            profile: aws.profile.clone(),
        },
    };
    let ec2 = novacron_ec2::Ec2::new(novacron_ec2::Settings {
        name: "aws".into(),
        region: aws.region.clone(),
        endpoint: aws.endpoint.clone(),
        credentials,
        instance_types: types.in_region(&aws.region),
        call_timeout: aws.call_timeout,
    })
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(ec2))
}
