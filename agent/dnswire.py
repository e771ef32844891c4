"""DNS label values and full decodes of sampled messages, with dnspython.

Everything here reads bytes that came off the wire: `decode` never raises
anything but `Rejected`, whose reason is one of a closed set, so a hostile
message costs a counted reject and nothing else.

Label values are closed sets (DESIGN.md): the standard mnemonics dnspython
knows, plus OTHER for any other number.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

OTHER = "OTHER"
QTYPES = {t.value: t.name for t in dns.rdatatype.RdataType if t.value != 0}
RCODES = {r.value: r.name for r in dns.rcode.Rcode if r.value < 16}  # the header holds 4 bits
MAX_ANSWERS = 16  # answers kept per transaction
MAX_ANSWER_TEXT = 256
REASONS = ("short", "bad_pointer", "bad_name", "malformed", "error")


def qtype_name(value: int) -> str:
    return QTYPES.get(value, OTHER)


def rcode_name(value: int) -> str:
    return RCODES.get(value, OTHER)


class Rejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Decoded:
    name: str | None
    answers: tuple[str, ...]


def _reason(e: Exception) -> str:
    if isinstance(e, dns.message.ShortHeader):
        return "short"
    if isinstance(e, dns.name.BadPointer):
        return "bad_pointer"
    if isinstance(e, (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.BadLabelType)):
        return "bad_name"
    if isinstance(e, dns.exception.DNSException):
        return "malformed"
    return "error"


def decode(wire: bytes, complete: bool = True) -> Decoded:
    """Name and answers of one message. `complete`: `wire` is the whole message;
    a message cut short by the sample size still yields its name."""
    try:
        msg = dns.message.from_wire(wire, ignore_trailing=True, one_rr_per_rrset=True)
    except Exception as e:  # noqa: BLE001 - hostile input: any failure is a reject
        if complete:
            raise Rejected(_reason(e)) from None
        try:
            msg = dns.message.from_wire(wire, question_only=True, ignore_trailing=True)
        except Exception as e2:  # noqa: BLE001
            raise Rejected(_reason(e2)) from None
    try:
        name = msg.question[0].name.to_text(omit_final_dot=True) if msg.question else None
        answers = []
        for rrset in msg.answer:
            for rdata in rrset:
                if len(answers) < MAX_ANSWERS:
                    answers.append(rdata.to_text()[:MAX_ANSWER_TEXT])
    except Exception as e:  # noqa: BLE001 - rdata that parsed but does not print
        raise Rejected(_reason(e)) from None
    return Decoded(name, tuple(answers))
