"""choysez-auditd: audits Choysez mail and classroom traffic against the social media policy."""

__version__ = "0.1.0"
