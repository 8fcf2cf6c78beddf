//! NovaCron's AWS EC2 provider: [`Ec2`] implements
//! [`novacron_cloud::Provider`] on `aws-sdk-ec2`.
//!
//! - this file: [`Settings`], the client (rustls with ring, the SDK's own
//!   retries off, one timeout for a whole call) and the provider calls;
//! - [`credentials`]: static keys or the standard AWS environment variables
//!   and shared files, resolved by a pure function, never shown;
//! - [`errors`]: EC2's answers classified as throttled, transient or
//!   permanent;
//! - [`convert`]: EC2's shapes to and from `novacron-cloud`'s.
//!
//! Each call is one request (the broker retries, see
//! `novacron_cloud::provider`). The driver logs no request or answer body;
//! credentials appear in no log line, error or `Debug` output.

pub mod convert;
pub mod credentials;
pub mod errors;

use std::time::Duration;

use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{BehaviorVersion, Region};
use aws_sdk_ec2::types::{Filter, ResourceType, TagSpecification};
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider as TlsProvider};
use novacron_cloud::{Instance, InstanceType, LaunchSpec, Provider, ProviderError, ProviderFuture};

pub use aws_sdk_ec2;
pub use credentials::{CredentialSource, Credentials, CredentialsError};

/// EC2's limit on the values of one DescribeInstances filter.
const FILTER_VALUES_MAX: usize = 200;
/// Pages of one listing before the answer is taken as broken (1,000 pages
/// of up to 1,000 instances each).
const PAGES_MAX: usize = 1000;

/// How to reach EC2 in one region.
#[derive(Clone)]
pub struct Settings {
    /// The provider's name in the config ("aws").
    pub name: String,
    /// The region (e.g. `us-east-1`).
    pub region: String,
    /// The endpoint, e.g. "http://127.0.0.1:5000" (moto); AWS's when absent.
    pub endpoint: Option<String>,
    /// Where the keys come from.
    pub credentials: CredentialSource,
    /// This region's instance types, from the table.
    pub instance_types: Vec<InstanceType>,
    /// The most one whole call (connect and answer) may take.
    pub call_timeout: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("name", &self.name)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("credentials", &self.credentials)
            .field("instance_types", &self.instance_types.len())
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

/// The driver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    /// The credentials could not be resolved.
    #[error("provider {name:?}: AWS credentials")]
    Credentials {
        /// The provider.
        name: String,
        /// Why.
        #[source]
        source: CredentialsError,
    },
    /// A setting is unusable.
    #[error("provider {name:?}: {key}: {why}")]
    Setting {
        /// The provider.
        name: String,
        /// The setting (`region`, `endpoint`, `call_timeout`).
        key: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// The EC2 provider of one region.
pub struct Ec2 {
    name: String,
    region: String,
    endpoint: Option<String>,
    instance_types: Vec<InstanceType>,
    page_size: Option<i32>,
    client: aws_sdk_ec2::Client,
}

impl std::fmt::Debug for Ec2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2")
            .field("name", &self.name)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("credentials", &"<redacted>")
            .field("instance_types", &self.instance_types.len())
            .finish()
    }
}

impl Ec2 {
    /// Builds the driver: resolves the credentials (from the process
    /// environment and files for [`CredentialSource::Standard`]) and
    /// configures the client. Makes no request.
    pub fn new(settings: Settings) -> Result<Ec2, Ec2Error> {
        let creds = credentials::resolve(&settings.credentials, &|k| std::env::var(k).ok(), &|p| {
            match std::fs::read_to_string(p) {
                Ok(t) => Ok(Some(t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        })
        .map_err(|source| Ec2Error::Credentials {
            name: settings.name.clone(),
            source,
        })?;
        Self::with_credentials(settings, creds)
    }

    /// Builds the driver with keys already resolved (`settings.credentials`
    /// is not read).
    pub fn with_credentials(settings: Settings, creds: Credentials) -> Result<Ec2, Ec2Error> {
        let bad = |key, why: &str| Ec2Error::Setting {
            name: settings.name.clone(),
            key,
            why: why.to_owned(),
        };
        let region_ok = |r: &str| {
            !r.is_empty()
                && r.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        };
        if !region_ok(&settings.region) {
            return Err(bad("region", "must be a region name like us-east-1"));
        }
        if let Some(e) = &settings.endpoint {
            let rest = e.strip_prefix("https://").or_else(|| e.strip_prefix("http://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                return Err(bad("endpoint", "must be an http:// or https:// URL"));
            }
        }
        if settings.call_timeout.is_zero() {
            return Err(bad("call_timeout", "must be more than zero"));
        }
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(TlsProvider::Rustls(CryptoMode::Ring))
            .build_https();
        let keys = aws_sdk_ec2::config::Credentials::new(
            creds.access_key_id,
            creds.secret_access_key,
            creds.session_token,
            None,
            "novacron",
        );
        let mut config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .credentials_provider(keys)
            .http_client(http)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(settings.call_timeout)
                    .operation_timeout(settings.call_timeout)
                    .build(),
            );
        if let Some(e) = &settings.endpoint {
            config = config.endpoint_url(e);
        }
        Ok(Ec2 {
            name: settings.name,
            region: settings.region,
            endpoint: settings.endpoint,
            instance_types: settings.instance_types,
            page_size: None,
            client: aws_sdk_ec2::Client::from_conf(config.build()),
        })
    }

    /// Asks for at most `n` instances per DescribeInstances page (clamped
    /// to EC2's 5–1000; EC2's own page size otherwise): lets tests walk
    /// several pages of a listing.
    pub fn page_size(mut self, n: i32) -> Self {
        self.page_size = Some(n.clamp(5, 1000));
        self
    }

    /// The SDK client this driver calls through, for tools and tests that
    /// need calls the provider interface does not make.
    pub fn sdk_client(&self) -> &aws_sdk_ec2::Client {
        &self.client
    }

    async fn run(&self, spec: &LaunchSpec) -> Result<Instance, ProviderError> {
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .set_tags(Some(convert::to_tags(&spec.tags)))
            .build();
        let out = self
            .client
            .run_instances()
            .min_count(1)
            .max_count(1)
            .image_id(&spec.image)
            .instance_type(spec.instance_type.as_str().into())
            .set_user_data(spec.user_data.as_ref().map(|u| convert::base64(u.as_bytes())))
            .set_subnet_id(spec.subnet.clone())
            .set_security_group_ids((!spec.security_groups.is_empty()).then(|| spec.security_groups.clone()))
            .set_key_name(spec.key_name.clone())
            .client_token(&spec.launch_id)
            .tag_specifications(tags)
            .send()
            .await
            .map_err(|e| errors::from_sdk("RunInstances", e))?;
        out.instances().iter().find_map(convert::instance).ok_or_else(|| {
            // The launch may have happened: transient, so the broker looks
            // the launch tag up before anything else.
            ProviderError::Transient("RunInstances answered without an instance".into())
        })
    }

    /// DescribeInstances with `filter`, every page.
    async fn describe_filtered(&self, filter: Filter) -> Result<Vec<Instance>, ProviderError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..PAGES_MAX {
            let page = self
                .client
                .describe_instances()
                .filters(filter.clone())
                .set_max_results(self.page_size)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| errors::from_sdk("DescribeInstances", e))?;
            for r in page.reservations() {
                out.extend(r.instances().iter().filter_map(convert::instance));
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => return Ok(out),
            }
        }
        Err(ProviderError::Transient(format!(
            "DescribeInstances gave more than {PAGES_MAX} pages"
        )))
    }

    async fn describe_ids(&self, ids: &[String]) -> Result<Vec<Instance>, ProviderError> {
        let mut out = Vec::with_capacity(ids.len());
        // A filter, not InstanceIds: an unknown id is left out instead of
        // failing the whole batch with InvalidInstanceID.NotFound.
        for chunk in ids.chunks(FILTER_VALUES_MAX) {
            let f = Filter::builder()
                .name("instance-id")
                .set_values(Some(chunk.to_vec()))
                .build();
            out.extend(self.describe_filtered(f).await?);
        }
        Ok(out)
    }

    async fn terminate_one(&self, id: &str) -> Result<(), ProviderError> {
        match self.client.terminate_instances().instance_ids(id).send().await {
            Ok(_) => Ok(()),
            Err(e) => match errors::from_sdk("TerminateInstances", e) {
                // Gone already (EC2 forgets terminated instances after a while).
                ProviderError::Permanent { code, .. } if code == "InvalidInstanceID.NotFound" => Ok(()),
                e => Err(e),
            },
        }
    }
}

impl Provider for Ec2 {
    fn name(&self) -> &str {
        &self.name
    }

    fn region(&self) -> &str {
        &self.region
    }

    fn instance_types(&self) -> &[InstanceType] {
        &self.instance_types
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> ProviderFuture<'a, Instance> {
        Box::pin(self.run(spec))
    }

    fn describe<'a>(&'a self, ids: &'a [String]) -> ProviderFuture<'a, Vec<Instance>> {
        Box::pin(self.describe_ids(ids))
    }

    fn list_by_tag<'a>(&'a self, key: &'a str, value: &'a str) -> ProviderFuture<'a, Vec<Instance>> {
        Box::pin(self.describe_filtered(Filter::builder().name(format!("tag:{key}")).values(value).build()))
    }

    fn start<'a>(&'a self, id: &'a str) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            self.client
                .start_instances()
                .instance_ids(id)
                .send()
                .await
                .map(drop)
                .map_err(|e| errors::from_sdk("StartInstances", e))
        })
    }

    fn stop<'a>(&'a self, id: &'a str) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            self.client
                .stop_instances()
                .instance_ids(id)
                .send()
                .await
                .map(drop)
                .map_err(|e| errors::from_sdk("StopInstances", e))
        })
    }

    fn terminate<'a>(&'a self, id: &'a str) -> ProviderFuture<'a, ()> {
        Box::pin(self.terminate_one(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    const TOKEN: &str = "FwoGZXIvYXdzEXAMPLETOKEN";

    /// A loopback endpoint nothing listens on.
    fn closed_endpoint() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    fn settings() -> Settings {
        Settings {
            name: "aws".into(),
            region: "us-east-1".into(),
            endpoint: Some(closed_endpoint()),
            credentials: CredentialSource::Static(Credentials {
                access_key_id: "AKIATEST".into(),
                secret_access_key: SECRET.into(),
                session_token: Some(TOKEN.into()),
            }),
            instance_types: Vec::new(),
            call_timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn debug_of_settings_and_driver_hides_the_keys() {
        let s = settings();
        let ec2 = Ec2::new(s.clone()).unwrap();
        for shown in [format!("{s:?}"), format!("{ec2:?}")] {
            assert!(!shown.contains(SECRET) && !shown.contains(TOKEN), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
    }

    #[test]
    fn bad_settings_are_refused_naming_the_key() {
        for (edit, key) in [
            (
                Box::new(|s: &mut Settings| s.region = "US East".into()) as Box<dyn Fn(&mut Settings)>,
                "region",
            ),
            (
                Box::new(|s: &mut Settings| s.endpoint = Some("127.0.0.1:5000".into())),
                "endpoint",
            ),
            (
                Box::new(|s: &mut Settings| s.call_timeout = Duration::ZERO),
                "call_timeout",
            ),
        ] {
            let mut s = settings();
            edit(&mut s);
            let err = Ec2::new(s).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_transient() {
        let ec2 = Ec2::new(settings()).unwrap();
        let err = ec2.describe(&["i-1".to_owned()]).await.unwrap_err();
        assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");
        let shown = format!("{err:?} {err}");
        assert!(!shown.contains(SECRET) && !shown.contains(TOKEN), "{shown}");
    }

    #[tokio::test]
    async fn no_ids_make_no_call() {
        let ec2 = Ec2::new(settings()).unwrap();
        assert_eq!(ec2.describe(&[]).await.unwrap(), Vec::new());
    }
}
