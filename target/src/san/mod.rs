//! SAN backends: where a volume's data finally lives. An iSCSI LUN through the system's
//! libiscsi (feature `iscsi`, which needs `libiscsi-dev`) or a file/block device
//! (`volume::devices::BdevPort`). The write-back engine's destager drives them through the
//! `policy` crate's SAN trait. URL parsing lives here, outside the feature, so a configuration
//! can be checked by any build.

#[cfg(feature = "iscsi")]
pub mod iscsi;

/// Where an `iscsi://HOST[:PORT]/TARGET-IQN/LUN` URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IscsiUrl {
    pub portal: String,
    pub target: String,
    pub lun: u16,
}

impl IscsiUrl {
    /// Parses the URL; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<IscsiUrl, &'static str> {
        let rest = url.strip_prefix("iscsi://").ok_or("it does not start with iscsi://")?;
        let mut parts = rest.splitn(3, '/');
        let (host, target, lun) = (parts.next(), parts.next(), parts.next());
        let host = host.filter(|h| !h.is_empty()).ok_or("no host")?;
        let target = target.filter(|t| !t.is_empty()).ok_or("no target IQN")?;
        let lun = lun.ok_or("no LUN")?;
        if lun.is_empty() || !lun.bytes().all(|b| b.is_ascii_digit()) {
            return Err("the LUN is not a number");
        }
        // SCSI flat-space LUNs go up to 16383; libiscsi takes them as such.
        let lun = lun.parse::<u16>().ok().filter(|&n| n <= 16383).ok_or("the LUN is out of range (0 to 16383)")?;
        let portal = if host.contains(':') { host.to_string() } else { format!("{host}:3260") };
        Ok(IscsiUrl { portal, target: target.to_string(), lun })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = IscsiUrl::parse("iscsi://127.0.0.1:3262/iqn.2026-11.dev.stager:san/1").unwrap();
        assert_eq!(
            u,
            IscsiUrl { portal: "127.0.0.1:3262".into(), target: "iqn.2026-11.dev.stager:san".into(), lun: 1 }
        );
        assert_eq!(IscsiUrl::parse("iscsi://h/t/0").unwrap().portal, "h:3260");
        for bad in [
            "",
            "http://h/t/1",
            "iscsi://",
            "iscsi://h",
            "iscsi://h/t",
            "iscsi://h/t/x",
            "iscsi://h/t/16384",
            "iscsi://h/t/99999999",
            "iscsi:///t/1",
            "iscsi://h//1",
        ] {
            assert!(IscsiUrl::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
