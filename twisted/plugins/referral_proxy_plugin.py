from twisted.application.service import ServiceMaker

referralProxy = ServiceMaker(
    "referral-proxy", "referral_proxy.tap", "IMAP referral proxy in front of IMAP backends", "referral-proxy"
)
