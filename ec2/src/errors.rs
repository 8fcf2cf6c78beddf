//! What an EC2 failure means for the broker: throttled, transient or
//! permanent.
//!
//! [`classify`] is a pure function from the HTTP status and EC2's error
//! code onto [`ProviderError`]; [`from_sdk`] feeds it from an SDK error
//! (timeouts and dispatch failures, which have no answer, are transient).
//! Nothing here retries. Messages are EC2's own or the SDK's description of
//! a connection failure; neither carries credentials (requests are signed,
//! and the signature is never part of an error).

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use novacron_cloud::ProviderError;

/// EC2 codes that mean "slow down".
const THROTTLED: [&str; 4] = [
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
];

/// EC2 codes that mean "the service failed, try again".
const TRANSIENT: [&str; 4] = [
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
];

/// EC2 codes that are final even though EC2 sends them with a 5xx status
/// (no capacity for the type: AWS answers `500 InsufficientInstanceCapacity`).
const PERMANENT_ON_5XX: [&str; 4] = [
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
];

/// Classifies an answer EC2 gave: `status` is the HTTP status, `code` and
/// `message` EC2's error code and message when the body had them.
pub fn classify(status: u16, code: Option<&str>, message: Option<&str>) -> ProviderError {
    let code = code.filter(|c| !c.is_empty());
    let describe = || {
        let mut s = code.unwrap_or("no error code").to_owned();
        if let Some(m) = message.filter(|m| !m.is_empty()) {
            s.push_str(": ");
            s.push_str(m);
        }
        format!("HTTP {status}, {s}")
    };
    if code.is_some_and(|c| THROTTLED.contains(&c)) {
        return ProviderError::Throttled(describe());
    }
    if code.is_some_and(|c| TRANSIENT.contains(&c)) {
        return ProviderError::Transient(describe());
    }
    if let Some(code) = code.filter(|c| PERMANENT_ON_5XX.contains(c)) {
        return ProviderError::Permanent {
            code: code.to_owned(),
            message: message.unwrap_or_default().to_owned(),
        };
    }
    if status == 429 || status == 503 {
        return ProviderError::Throttled(describe());
    }
    if (500..600).contains(&status) {
        return ProviderError::Transient(describe());
    }
    match code {
        Some(code) => ProviderError::Permanent {
            code: code.to_owned(),
            message: message.unwrap_or_default().to_owned(),
        },
        // A client error without a code (an answer that is not EC2's XML):
        // retrying the same request will not change it.
        None => ProviderError::Permanent {
            code: format!("HTTP{status}"),
            message: message.unwrap_or("the answer had no EC2 error code").to_owned(),
        },
    }
}

/// Classifies a failed SDK call of operation `op` (e.g. `RunInstances`).
pub fn from_sdk<E>(op: &str, err: SdkError<E>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    match (&err, status) {
        (SdkError::ServiceError(_), Some(status)) | (SdkError::ResponseError(_), Some(status)) => {
            let mut e = classify(status, err.code(), err.message());
            if let ProviderError::Throttled(m) | ProviderError::Transient(m) = &mut e {
                *m = format!("{op}: {m}");
            }
            e
        }
        (SdkError::TimeoutError(_), _) => ProviderError::Transient(format!("{op}: timed out")),
        (SdkError::DispatchFailure(_), _) => ProviderError::Transient(format!(
            "{op}: the request could not be sent: {}",
            DisplayErrorContext(&err)
        )),
        // A request the SDK could not build (an invalid parameter, or an
        // endpoint that is not a URL): the same request fails again.
        (SdkError::ConstructionFailure(_), _) => ProviderError::Permanent {
            code: "RequestConstruction".to_owned(),
            message: format!("{op}: {}", DisplayErrorContext(&err)),
        },
        // Any later kind of SDK error: retrying is the safe reading.
        _ => ProviderError::Transient(format!("{op}: {}", DisplayErrorContext(&err))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttled(e: &ProviderError) -> bool {
        matches!(e, ProviderError::Throttled(_))
    }

    fn transient(e: &ProviderError) -> bool {
        matches!(e, ProviderError::Transient(_))
    }

    #[test]
    fn throttling_codes_and_statuses_are_throttled() {
        for code in ["RequestLimitExceeded", "Throttling", "ThrottlingException"] {
            assert!(throttled(&classify(400, Some(code), Some("slow down"))), "{code}");
        }
        assert!(throttled(&classify(503, Some("RequestLimitExceeded"), None)));
        assert!(throttled(&classify(429, None, None)));
        assert!(throttled(&classify(503, None, None)));
        assert!(throttled(&classify(503, Some("SomethingElse"), None)));
    }

    #[test]
    fn server_errors_are_transient() {
        for code in ["InternalError", "ServiceUnavailable", "Unavailable"] {
            assert!(transient(&classify(400, Some(code), None)), "{code}");
        }
        assert!(transient(&classify(500, Some("InternalError"), Some("oops"))));
        assert!(transient(&classify(500, None, None)));
        assert!(transient(&classify(502, Some("Whatever"), None)));
    }

    #[test]
    fn everything_else_is_permanent_with_the_code_and_message() {
        for code in [
            "InvalidAMIID.NotFound",
            "InvalidAMIID.Malformed",
            "UnauthorizedOperation",
            "AuthFailure",
            "InsufficientInstanceCapacity",
            "InvalidParameterValue",
        ] {
            let got = classify(400, Some(code), Some("the reason"));
            assert_eq!(
                got,
                ProviderError::Permanent {
                    code: code.into(),
                    message: "the reason".into()
                }
            );
            assert!(!got.retryable());
        }
        // AWS sends "no capacity" as a 500: still final.
        assert!(!classify(500, Some("InsufficientInstanceCapacity"), None).retryable());
        assert!(matches!(
            classify(403, None, None),
            ProviderError::Permanent { code, .. } if code == "HTTP403"
        ));
    }

    #[test]
    fn messages_keep_the_status_and_code() {
        let ProviderError::Throttled(m) =
            classify(503, Some("RequestLimitExceeded"), Some("Request limit exceeded."))
        else {
            unreachable!("a throttle")
        };
        assert_eq!(m, "HTTP 503, RequestLimitExceeded: Request limit exceeded.");
    }
}
