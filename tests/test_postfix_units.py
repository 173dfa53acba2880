"""The Postfix plug-in's pure parts and its validator, fast (no lab, no network, no bus).

* settings: every bad ``[services.postfix]`` value is one line naming the key, directly and
  through the cluster-file parser (the plug-in's ``check_config``);
* render: the fragment parser (with a hypothesis property), main.cf / master.cf following
  the held VIPs, and Debian's own ``postconf`` reading what was rendered without a warning;
* validate: the commit-time check over the real ``postconf`` / ``postfix check``, its cache;
* maillog: line splitting (hypothesis: nothing lost, nothing invented), batch landing,
  connection counting, the state file read from garbage;
* the service refusing to run (missing Postfix, missing maildir owner) without a crash.
"""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ecluster.clusterfile import ClusterFileError, parse_cluster
from ecluster_postfix import maillog, validate
from ecluster_postfix.maillog import (MAX_LINE, TailState, audit_sender, connect_events, landed,
                                      split_lines)
from ecluster_postfix.render import (MANAGED, FragmentError, Parameter, Paths, listen_addresses, main_cf,
                                     master_cf, parse_fragment, transport_name, vmailbox)
from ecluster_postfix.settings import PostfixConfigError, Settings, check_settings

POSTCONF = validate.POSTCONF
HAVE_POSTCONF = os.path.exists(POSTCONF)
needs_postconf = pytest.mark.skipif(not HAVE_POSTCONF, reason=f"{POSTCONF} is missing (apt-get install postfix)")
JOURNAL_LOGS = ["mainlog", "rejectlog", "audit"]


def settings(**table) -> Settings:
    return check_settings(table, member="n1", cluster="lab", journal_logs=JOURNAL_LOGS)


# -- settings -------------------------------------------------------------------------------

def test_good_table_gives_settings():
    s = settings(domains=["Example.COM.", "mail.example.org"], relayhost="[10.99.0.2]:2525",
                 mynetworks=["127.0.0.1/8", "10.99.0.0/24"], port=2525, loopback=False,
                 hostname="MX1.Example.com.", message_size_limit=2048, maildir_owner="nobody",
                 mail="maildirs", log="rejectlog", maillog_rotate_mb=1.5, postfix="/usr/sbin/postfix",
                 nonlocal_bind=False)
    assert s == Settings(domains=("example.com", "mail.example.org"), relayhost="[10.99.0.2]:2525",
                         mynetworks=("127.0.0.0/8", "10.99.0.0/24"), port=2525, loopback=False,
                         hostname="mx1.example.com", message_size_limit=2048, maildir_owner="nobody",
                         mail="maildirs", log="rejectlog", maillog_rotate_bytes=3 * 512 * 1024,
                         postfix="/usr/sbin/postfix", nonlocal_bind=False)


def test_defaults():
    s = check_settings({}, member="n_1", cluster="lab", journal_logs=JOURNAL_LOGS)
    assert s.domains == () and s.relayhost == "" and s.mynetworks == ("127.0.0.0/8",)
    assert (s.port, s.loopback, s.maildir_owner, s.mail, s.log) == (25, True, "nobody", "mail", "mainlog")
    assert s.hostname == "n-1.lab.invalid"          # '_' is not allowed in a host name
    assert s.maillog_rotate_bytes == 64 << 20 and s.postfix == "/usr/sbin/postfix" and s.nonlocal_bind


@pytest.mark.parametrize("key, value", [
    ("domains", ["not a domain"]),
    ("domains", ["localhost"]),
    ("domains", [42]),
    ("domains", ["example.com", "EXAMPLE.com."]),
    ("relayhost", "a b"),
    ("relayhost", "[10.0.0.1]:99999"),
    ("relayhost", "[10.0.0.1]:0"),
    ("relayhost", "host1, host2"),
    ("mynetworks", ["10.0.0.0/33"]),
    ("mynetworks", ["not-a-net"]),
    ("mynetworks", [10]),
    ("port", 0),
    ("port", 65536),
    ("hostname", "nodots"),
    ("hostname", "bad_name.example.com"),
    ("message_size_limit", 1023),
    ("maildir_owner", "Bad User"),
    ("maildir_owner", ""),
    ("mail", ""),
    ("mail", "a/b"),
    ("mail", ".hidden"),
    ("mail", "postfix"),
    ("mail", "conf"),
    ("log", "bad name!"),
    ("log", "otherlog"),
    ("maillog_rotate_mb", 0),
    ("maillog_rotate_mb", (1 << 20) + 1),
    ("postfix", "usr/sbin/postfix"),
    ("postfix", ""),
])
def test_bad_value_names_the_key(key, value):
    with pytest.raises(PostfixConfigError) as err:
        settings(**{key: value})
    msg = str(err.value)
    assert "\n" not in msg
    assert f"'services.postfix.{key}'" in msg, msg
    assert isinstance(err.value, ClusterFileError)


def test_log_not_in_journal_says_how_to_fix():
    with pytest.raises(PostfixConfigError, match=r"\[jlog\]\.logs"):
        settings(log="otherlog")
    assert check_settings({"log": "otherlog"}, member="n1", cluster="lab",
                          journal_logs=JOURNAL_LOGS + ["otherlog"]).log == "otherlog"


CLUSTER = """
[cluster]
name = "lab"
[nodes.n1]
address = "127.0.0.1"
data_dir = "d1"
[nodes.n2]
address = "127.0.0.2"
data_dir = "d2"
"""


def cluster_file(postfix_table: str, tmp: Path | None = None, extra: str = ""):
    path = (tmp or Path("/etc/ecluster")) / "cluster.toml"
    return parse_cluster(CLUSTER + extra + "[services.postfix]\n" + postfix_table, path), path


def test_cluster_file_with_good_table_parses():
    c, _ = cluster_file('domains = ["example.com"]\nport = 2525\nlog = "maillog"\n',
                        extra='[jlog]\nlogs = ["maillog"]\n')
    assert c.services["postfix"]["port"] == 2525 and c.services["postfix"]["domains"] == ["example.com"]


@pytest.mark.parametrize("line, key", [
    ("port = 70000", "port"),
    ('domains = ["bad domain"]', "domains"),
    ('log = "nosuchlog"', "log"),
    ('postfix = "postfix"', "postfix"),
    ('maildir_owner = "Root User"', "maildir_owner"),
])
def test_cluster_file_bad_value_fails_at_parse_time(line, key):
    with pytest.raises(ClusterFileError) as err:
        cluster_file(line + "\n")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("/etc/ecluster/cluster.toml: "), msg
    assert f"'services.postfix.{key}'" in msg, msg
    assert msg.count("/etc/ecluster/cluster.toml") == 1, msg     # the file named once, not twice


def test_cluster_file_unknown_key_is_named():
    with pytest.raises(ClusterFileError) as err:
        cluster_file("colour = 1\n")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("/etc/ecluster/cluster.toml: ")
    assert "unknown key" in msg and "'services.postfix.colour'" in msg, msg


def test_cluster_file_wrong_type_is_named():
    with pytest.raises(ClusterFileError, match=r"'services\.postfix\.port'"):
        cluster_file('port = "25"\n')


# -- render.parse_fragment -------------------------------------------------------------------

F = "global/postfix/main.cf.d/10-local.cf"


def test_fragment_syntax():
    text = ("# a comment\n"
            "\n"
            "smtpd_banner = $myhostname ESMTP\n"
            "   ready\n"
            "\tand waiting\n"
            "   # an indented comment is a comment, not a continuation\n"
            "\n"
            "smtpd_recipient_limit=500\n"
            "empty_value =\n"
            "delay_warning_time   =   4h   \n")
    assert parse_fragment(F, text) == [
        Parameter(F, 3, "smtpd_banner", "$myhostname ESMTP ready and waiting"),
        Parameter(F, 8, "smtpd_recipient_limit", "500"),
        Parameter(F, 9, "empty_value", ""),
        Parameter(F, 10, "delay_warning_time", "4h"),
    ]
    assert parse_fragment(F, "") == [] and parse_fragment(F, "# only\n\n  # comments\n") == []


def test_fragment_crlf():
    assert parse_fragment(F, "a_b = 1\r\n  2\r\n") == [Parameter(F, 1, "a_b", "1 2")]


def fragment_error(text: str) -> FragmentError:
    with pytest.raises(FragmentError) as err:
        parse_fragment(F, text)
    assert str(err.value) == f"{F}:{err.value.line}: {err.value.reason}"
    assert "\n" not in str(err.value)
    return err.value


@pytest.mark.parametrize("name", sorted(MANAGED))
def test_fragment_managed_parameter_refused(name):
    e = fragment_error(f"# ok\nsmtpd_banner = x\n{name} = something\n")
    assert (e.file, e.line) == (F, 3)
    assert name in e.reason and "ecluster" in e.reason
    assert str(e).startswith(f"{F}:3: ")


@pytest.mark.parametrize("text, line, words", [
    ("smtpd_banner = x\nbad-name = 1\n", 2, "bad parameter name"),
    ("bad name = 1\n", 1, "bad parameter name"),
    ("= 1\n", 1, "bad parameter name"),
    ("\n\nsmtpd_banner x\n", 3, "not 'name = value'"),
    ("  continued = 1\n", 1, "continuation line without a parameter"),
    ("# c\n\n\tcontinued\nx = 1\n", 3, "continuation line without a parameter"),
    ("a = 1\nb = \0\n", 2, "NUL"),
])
def test_fragment_errors_name_the_line(text, line, words):
    e = fragment_error(text)
    assert e.line == line and words in e.reason, e


def test_fragment_stops_at_the_first_problem():
    e = fragment_error("a = 1\nmyhostname = x\nbad-name = 2\n")
    assert e.line == 2


FRAGMENT_CHARS = st.sampled_from(list("ab_1 \t=#\n\r\0\x0c\x1f\xa0$-") + ["myhostname", "smtpd_banner", "\u2028"])
fragment_texts = st.one_of(st.text(max_size=300), st.lists(FRAGMENT_CHARS, max_size=80).map("".join))


@hsettings(max_examples=250, deadline=None)
@given(fragment_texts)
def test_fragment_parser_property(text):
    try:
        params = parse_fragment(F, text)
    except FragmentError as e:
        assert 1 <= e.line <= max(1, len(text.splitlines())) and e.file == F
        return
    lines = text.splitlines()
    for p in params:
        assert p.file == F
        assert re.fullmatch(r"[A-Za-z0-9_]+", p.name) and p.name not in MANAGED
        assert 1 <= p.line <= len(lines)
        assert lines[p.line - 1].startswith(p.name), (p, lines[p.line - 1])
        assert "\n" not in p.value and "\0" not in p.value
    assert [p.line for p in params] == sorted({p.line for p in params})


# -- render: main.cf, master.cf, vmailbox ----------------------------------------------------

PATHS = Paths(Path("/var/lib/ecluster/n1/postfix"))
S = settings(domains=["example.com", "example.org"], relayhost="[10.99.0.2]:2525",
             mynetworks=["127.0.0.0/8", "10.99.0.0/24"])


def params_of(main: str) -> dict[str, str]:
    out = {}
    for line in main.splitlines():
        if line and not line.startswith("#"):
            k, eq, v = line.partition(" = ")
            if not eq:
                k, v = line.rstrip(" =").rstrip(), ""
                assert line.endswith("="), line
            out[k] = v
    return out


def render_main(held_outbound=(), outbound_configured=False, fragments=(), s=S) -> dict[str, str]:
    return params_of(main_cf(s, PATHS, uid=65534, gid=65533, held_outbound=tuple(held_outbound),
                             outbound_configured=outbound_configured, fragments=list(fragments)))


def test_transport_name():
    assert transport_name("10.99.0.200") == "ecl_out_10_99_0_200"
    assert transport_name("fd00::1") == "ecl_out_fd00__1"
    assert re.fullmatch(r"[A-Za-z0-9_]+", transport_name("10.0.0.1"))
    assert transport_name("10.0.0.1") != transport_name("10.0.0.11")


def test_listen_addresses():
    assert listen_addresses(S, ()) == ["127.0.0.1:25"]
    assert listen_addresses(S, ("10.99.0.101", "10.99.0.100")) == ["127.0.0.1:25", "10.99.0.100:25",
                                                                   "10.99.0.101:25"]
    s = settings(loopback=False, port=2525)
    assert listen_addresses(s, ()) == []
    assert listen_addresses(s, ("10.99.0.100",)) == ["10.99.0.100:2525"]


def inet_services(master: str) -> list[str]:
    return [ln.split()[0] for ln in master.splitlines() if not ln.startswith((" ", "#")) and ln.split()[1] == "inet"]


def test_master_cf_listeners_are_the_held_injection_vips():
    m = master_cf(S, held_injection=("10.99.0.100",), held_outbound=())
    assert inet_services(m) == ["127.0.0.1:25", "10.99.0.100:25"]
    for ln in m.splitlines():
        if ln.startswith("10.99.0.100:25 "):
            assert ln.split()[1:] == ["inet", "n", "-", "n", "-", "-", "smtpd"]
    assert "ecl_out_" not in m
    none = master_cf(settings(loopback=False), held_injection=(), held_outbound=())
    assert inet_services(none) == []
    # the internal services are always there
    names = [ln.split()[0] for ln in none.splitlines() if ln and not ln.startswith((" ", "#"))]
    for svc in ("pickup", "cleanup", "qmgr", "smtp", "virtual", "retry", "error", "postlog", "showq"):
        assert svc in names


def test_master_cf_one_bound_transport_per_held_outbound_vip():
    m = master_cf(S, held_injection=(), held_outbound=("10.99.0.201", "10.99.0.200"))
    lines = m.splitlines()
    for a in ("10.99.0.200", "10.99.0.201"):
        i = lines.index(f"{transport_name(a)} unix - - n - - smtp")
        assert lines[i + 1] == f"  -o smtp_bind_address={a}"
        assert lines[i + 2] == f"  -o syslog_name=postfix/out-{a}"
    assert sum(ln.startswith("ecl_out_") for ln in lines) == 2
    assert m.endswith("\n")


def test_main_cf_managed_values():
    p = render_main()
    assert p["myhostname"] == "n1.lab.invalid" and p["mydestination"] == ""
    assert p["mynetworks"] == "127.0.0.0/8, 10.99.0.0/24" and p["relayhost"] == "[10.99.0.2]:2525"
    assert p["virtual_mailbox_domains"] == "example.com, example.org"
    assert p["virtual_uid_maps"] == "static:65534" and p["virtual_gid_maps"] == "static:65533"
    assert p["virtual_mailbox_base"] == "/var/lib/ecluster/n1/mail"
    assert p["virtual_mailbox_maps"] == "texthash:/var/lib/ecluster/n1/postfix/etc/vmailbox"
    assert p["config_directory"] == str(PATHS.etc) and p["queue_directory"] == str(PATHS.queue)
    assert p["maillog_file"] == str(PATHS.maillog) and p["command_directory"] == "/usr/sbin"
    assert p["message_size_limit"] == str(10 << 20)
    # every parameter a fragment may not set is one the plug-in owns; what it writes is managed
    assert set(p) - MANAGED == {"smtpd_relay_restrictions"}


def test_default_transport_plain_smtp_without_outbound_vips():
    p = render_main(held_outbound=(), outbound_configured=False)
    assert p["default_transport"] == p["relay_transport"] == "smtp"
    assert p["sender_dependent_default_transport_maps"] == ""


def test_default_transport_retry_when_no_configured_outbound_vip_is_held():
    p = render_main(held_outbound=(), outbound_configured=True)
    assert p["default_transport"].startswith("retry:4.")
    assert p["relay_transport"] == p["default_transport"]
    assert p["sender_dependent_default_transport_maps"] == ""


def test_default_transport_is_the_held_outbound_vip():
    p = render_main(held_outbound=("10.99.0.200",), outbound_configured=True)
    assert p["default_transport"] == p["relay_transport"] == "ecl_out_10_99_0_200"
    assert p["sender_dependent_default_transport_maps"] == ""


def test_several_held_outbound_vips_spread_with_randmap():
    p = render_main(held_outbound=("10.99.0.200", "10.99.0.201"), outbound_configured=True)
    assert p["default_transport"] == "ecl_out_10_99_0_200"
    assert p["sender_dependent_default_transport_maps"] == "randmap:{ecl_out_10_99_0_200, ecl_out_10_99_0_201}"


def test_fragments_come_after_the_managed_block():
    frags = parse_fragment(F, "smtpd_banner = $myhostname ESMTP\n  ready\n\nsmtpd_recipient_limit = 500\n")
    main = main_cf(S, PATHS, uid=1, gid=1, held_outbound=(), outbound_configured=False, fragments=frags)
    lines = main.splitlines()
    last_managed = max(i for i, ln in enumerate(lines) if ln.partition(" =")[0] in MANAGED)
    i = lines.index("smtpd_banner = $myhostname ESMTP ready")
    j = lines.index("smtpd_recipient_limit = 500")
    assert last_managed < i < j
    assert lines[i - 1] == f"# {F}:1" and lines[j - 1] == f"# {F}:4"
    assert main.endswith("\n")
    plain = main_cf(S, PATHS, uid=1, gid=1, held_outbound=(), outbound_configured=False, fragments=[])
    assert "from the replicated configuration" not in plain and "smtpd_banner" not in plain


def test_postfix_bin_sets_command_directory():
    main = main_cf(S, PATHS, uid=1, gid=1, held_outbound=(), outbound_configured=False, fragments=[],
                   postfix_bin="/opt/postfix/sbin/postfix")
    assert params_of(main)["command_directory"] == "/opt/postfix/sbin"


def test_vmailbox():
    assert vmailbox(S) == "@example.com example.com/\n@example.org example.org/\n"
    assert vmailbox(settings()) == ""


def postconf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([POSTCONF, *args], capture_output=True, text=True, timeout=20,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}, stdin=subprocess.DEVNULL)


@needs_postconf
def test_postfix_parses_what_was_rendered(tmp_path):
    paths = Paths(tmp_path / "postfix")
    paths.etc.mkdir(parents=True)
    frags = parse_fragment(F, "smtpd_banner = $myhostname ESMTP\n  ready\nsmtpd_recipient_limit = 500\n")
    main = main_cf(S, paths, uid=65534, gid=65534, held_outbound=("10.99.0.200", "10.99.0.201"),
                   outbound_configured=True, fragments=frags)
    master = master_cf(S, held_injection=("10.99.0.100",), held_outbound=("10.99.0.200", "10.99.0.201"))
    (paths.etc / "main.cf").write_text(main)
    (paths.etc / "master.cf").write_text(master)
    (paths.etc / "vmailbox").write_text(vmailbox(S))

    n = postconf("-c", str(paths.etc), "-n")
    assert n.returncode == 0 and n.stderr == "", n.stderr
    got = params_of(n.stdout)
    want = params_of(main)
    assert got == want          # every line read back as written: nothing lost, nothing unknown
    assert got["smtpd_banner"] == "$myhostname ESMTP ready"
    assert got["default_transport"] == "ecl_out_10_99_0_200"

    m = postconf("-c", str(paths.etc), "-M")
    assert m.returncode == 0 and m.stderr == "", m.stderr
    services = {tuple(ln.split()[:2]) for ln in m.stdout.splitlines()}
    assert {("127.0.0.1:25", "inet"), ("10.99.0.100:25", "inet"), ("ecl_out_10_99_0_200", "unix"),
            ("ecl_out_10_99_0_201", "unix"), ("retry", "unix"), ("postlog", "unix-dgram")} <= services
    p = postconf("-c", str(paths.etc), "-P")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert "ecl_out_10_99_0_200/unix/smtp_bind_address = 10.99.0.200" in p.stdout.splitlines()
    assert "ecl_out_10_99_0_201/unix/smtp_bind_address = 10.99.0.201" in p.stdout.splitlines()


@needs_postconf
def test_postconf_would_warn_about_an_unknown_parameter(tmp_path):
    """The check above can fail: postconf does warn about a name it does not know."""
    (tmp_path / "main.cf").write_text(main_cf(S, Paths(tmp_path), uid=1, gid=1, held_outbound=(),
                                              outbound_configured=False,
                                              fragments=[Parameter(F, 1, "no_such_parameter_x", "1")]))
    (tmp_path / "master.cf").write_text(master_cf(S, held_injection=(), held_outbound=()))
    n = postconf("-c", str(tmp_path), "-n")
    assert "unused parameter: no_such_parameter_x=1" in n.stderr


# -- validate --------------------------------------------------------------------------------

V = "global/postfix/main.cf.d/20-site.cf"


class NoSubprocess:
    """validate's subprocess.run replaced: counts the calls, or refuses them."""

    def __init__(self, allow: bool):
        self.allow, self.calls = allow, []
        self.real = subprocess.run

    def __call__(self, argv, *a, **kw):
        self.calls.append(list(argv))
        if not self.allow:
            raise AssertionError(f"validate ran {argv}")
        return self.real(argv, *a, **kw)


@needs_postconf
def test_validate_unknown_parameter_on_its_line():
    errors = validate.validate_file(V, b"# site settings\nsmtpd_banner = $myhostname hi\nno_such_param_x = 1\n")
    assert errors == [(3, "unknown Postfix parameter no_such_param_x (postconf: unused parameter)")]


@needs_postconf
def test_validate_numeric_parameter_with_a_word():
    errors = validate.validate_file("n1/postfix/main.cf.d/limits.cf",
                                    b"\n# limits\nsmtpd_recipient_limit = lots\n")
    assert (3, "smtpd_recipient_limit must be a number, got 'lots'") in errors
    assert all(line == 3 for line, _ in errors), errors


def test_validate_managed_parameter_without_running_postfix():
    with mock.patch.object(validate.subprocess, "run", NoSubprocess(allow=False)):
        errors = validate.validate_file(V, b"smtpd_banner = x\nrelayhost = [10.0.0.9]\n")
    assert len(errors) == 1 and errors[0][0] == 2 and "relayhost" in errors[0][1], errors


@pytest.mark.parametrize("path", ["global/postfix/main.cf", "default/postfix/master.cf",
                                  "n1/postfix/main.cf.d/x.conf", "global/postfix/main.cf.d/sub/x.cf",
                                  "global/postfix/notes.txt"])
def test_validate_other_files_under_postfix_refused(path):
    with mock.patch.object(validate.subprocess, "run", NoSubprocess(allow=False)):
        errors = validate.validate_file(path, b"smtpd_banner = x\n")
    assert errors == [(0, "only postfix/main.cf.d/<name>.cf files are read by ecluster-postfix")]


def test_validate_non_utf8():
    with mock.patch.object(validate.subprocess, "run", NoSubprocess(allow=False)):
        assert validate.validate_file(V, b"smtpd_banner = caf\xe9\n") == [(0, "not valid UTF-8")]


def test_validate_syntax_error_line():
    with mock.patch.object(validate.subprocess, "run", NoSubprocess(allow=False)):
        errors = validate.validate_file(V, b"a = 1\n\nthis is not a parameter\n")
    assert [line for line, _ in errors] == [3]


@pytest.mark.parametrize("path", ["global/hooks/vip.sh", "postfix/main.cf.d/a.cf", "global/other/postfix",
                                  "main.cf.d/a.cf", ""])
def test_validate_paths_outside_postfix_run_nothing(path):
    with mock.patch.object(validate.subprocess, "run", NoSubprocess(allow=False)):
        assert validate.validate_file(path, b"\xff\xfe garbage myhostname = x\n") == []


def test_validate_empty_fragment():
    with mock.patch.object(validate.subprocess, "run", NoSubprocess(allow=False)):
        assert validate.validate_file(V, b"# nothing yet\n\n") == []


@needs_postconf
def test_validate_good_fragment_and_the_cache():
    data = (f"# {os.getpid()} {id(object())}\n"       # bytes no other test validated: a cold cache
            "smtpd_banner = $myhostname ESMTP\n"
            "   ready\n"
            "smtpd_recipient_limit = 500\n"
            "delay_warning_time = 4h\n"
            "disable_vrfy_command = yes\n").encode()
    first = NoSubprocess(allow=True)
    with mock.patch.object(validate.subprocess, "run", first):
        assert validate.validate_file(V, data) == []
    assert any(argv[:2] == [POSTCONF, "-c"] for argv in first.calls), first.calls     # it did ask Postfix
    with mock.patch.object(validate.subprocess, "run", NoSubprocess(allow=False)):
        assert validate.validate_file(V, bytearray(data)) == []     # same bytes: no Postfix run at all
    # another path, same bytes: checked again (the answer is per path and content)
    again = NoSubprocess(allow=True)
    with mock.patch.object(validate.subprocess, "run", again), \
            mock.patch.object(validate, "deep_check", return_value=[(1, "sentinel")]):
        assert validate.validate_file("n2/postfix/main.cf.d/20-site.cf", data) == [(1, "sentinel")]


def test_validate_without_postfix_checks_syntax_only():
    with mock.patch.object(validate, "postfix_defaults", return_value=None), \
            mock.patch.object(validate.subprocess, "run", NoSubprocess(allow=False)):
        assert validate.deep_check([Parameter(V, 1, "no_such_param_y", "1")]) == []


@pytest.mark.parametrize("name, value, default, problem", [
    ("smtpd_recipient_limit", "lots", "1000", "must be a number"),
    ("smtpd_recipient_limit", "1000", "1000", None),
    ("smtpd_recipient_limit", "-1", "1000", None),
    ("smtpd_recipient_limit", "1.5", "1000", "must be a number"),
    ("smtpd_recipient_limit", "$other", "1000", None),
    ("smtpd_recipient_limit", "", "1000", None),
    ("x", "lots", None, None),
    ("disable_vrfy_command", "maybe", "no", "must be yes or no"),
    ("disable_vrfy_command", "YES", "no", None),
    ("disable_vrfy_command", "no", "no", None),
    # Postfix's boolean parser takes yes/no only (mail_conf_bool.c: "bad boolean configuration")
    ("disable_vrfy_command", "true", "no", "must be yes or no"),
    ("disable_vrfy_command", "false", "yes", "must be yes or no"),
    ("delay_warning_time", "4h", "0h", None),
    ("delay_warning_time", "30", "0h", None),
    ("delay_warning_time", "soon", "0h", "must be a time"),
    ("delay_warning_time", "4 h", "0h", "must be a time"),
    ("smtpd_banner", "anything at all", "$myhostname ESMTP $mail_name", None),
])
def test_value_problem(name, value, default, problem):
    got = validate.value_problem(name, value, default)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got and name in got and "\n" not in got


@needs_postconf
def test_postfix_refuses_true_as_a_boolean(tmp_path):
    """What the yes/no rule above stands on: Postfix itself refuses 'true' (postfix check
    parses the global booleans such as soft_bounce; a daemon's own fails only at its start)."""
    if os.geteuid() != 0:
        pytest.skip("postfix check needs root")
    errors = validate.deep_check([Parameter(V, 1, "soft_bounce", "true")])
    assert any(why.startswith("postfix check: ") for _, why in errors), errors      # Postfix's own word
    assert (1, "soft_bounce must be yes or no, got 'true'") in errors                 # and on its line


# -- maillog ---------------------------------------------------------------------------------

def test_split_lines_keeps_a_partial_last_line():
    lines, end = split_lines(b"one\ntwo\nthr", 100)
    assert lines == [(100, b"one"), (104, b"two")] and end == 108
    assert split_lines(b"", 7) == ([], 7)
    assert split_lines(b"partial", 7) == ([], 7)
    assert split_lines(b"\n\n", 0) == ([(0, b""), (1, b"")], 2)


def test_split_lines_cuts_an_overlong_line():
    long = b"x" * (MAX_LINE * 2 + 10)
    lines, end = split_lines(long + b"\nnext\n", 0)
    assert [(o, len(ln)) for o, ln in lines] == [(0, MAX_LINE), (MAX_LINE, MAX_LINE), (2 * MAX_LINE, 10),
                                               (2 * MAX_LINE + 11, 4)]
    assert end == len(long) + 6
    # exactly MAX_LINE bytes then a newline: one line, not cut
    assert split_lines(b"y" * MAX_LINE + b"\n", 0) == ([(0, b"y" * MAX_LINE)], MAX_LINE + 1)
    # overlong without a newline yet: cut pieces go, the rest (<= MAX_LINE) waits
    lines, end = split_lines(b"z" * (MAX_LINE + 3), 5)
    assert lines == [(5, b"z" * MAX_LINE)] and end == 5 + MAX_LINE
    assert split_lines(b"z" * MAX_LINE, 0) == ([], 0)


@hsettings(max_examples=120, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=1 << 40))
def test_split_lines_join_property(buf, base):
    lines, end = split_lines(buf, base)
    consumed = buf[:end - base]
    assert b"".join(ln + b"\n" for _, ln in lines) == consumed     # no line is longer than MAX_LINE here
    assert b"\n" not in buf[end - base:]                            # only a partial line is left
    pos = base
    for off, ln in lines:
        assert off == pos and b"\n" not in ln
        pos += len(ln) + 1


@hsettings(max_examples=120, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"bc", b"\n", b"0123456789"]), max_size=60).map(b"".join),
       st.integers(min_value=0, max_value=10 ** 6))
def test_split_lines_with_cuts_property(buf, base):
    small = 8
    with mock.patch.object(maillog, "MAX_LINE", small):
        lines, end = split_lines(buf, base)
    rebuilt, pos = b"", base
    for off, ln in lines:
        assert off == pos and b"\n" not in ln and len(ln) <= small
        rebuilt += ln
        pos += len(ln)
        if buf[pos - base:pos - base + 1] == b"\n":
            rebuilt += b"\n"
            pos += 1
        else:
            assert len(ln) == small           # only a full-size piece ends without a newline
    assert pos == end and rebuilt == buf[:end - base]
    rest = buf[end - base:]
    assert b"\n" not in rest and len(rest) <= small


def test_landed():
    assert landed(100, None, 5) == 0           # no sequence number saved: nothing is known to have landed
    assert landed(100, 100, 5) == 0
    assert landed(103, 100, 5) == 3
    assert landed(105, 100, 5) == 5
    assert landed(999, 100, 5) == 5            # clamped to the batch
    assert landed(90, 100, 5) == 0             # never negative
    assert landed(0, 0, 0) == 0


def test_connect_events():
    lines = [
        b"Dec  7 01:00:00 n1 postfix/smtpd[123]: connect from client.lab.test[10.97.0.2]",
        b"Dec  7 01:00:01 n1 postfix/smtpd[123]: disconnect from client.lab.test[10.97.0.2] ehlo=1 quit=1",
        b"Dec  7 01:00:02 n1 postfix/smtpd[124]: connect from unknown[10.97.0.2]",
        b"Dec  7 01:00:03 n1 postfix/out-10.97.0.200/smtpd[9]: connect from x[10.97.0.3]",
        b"Dec  7 01:00:04 n1 postfix/smtpd[125]: connect from v6.example[2001:db8::1]",
        b"Dec  7 01:00:05 n1 postfix/smtp[126]: connect from relay[10.97.0.9]",
        b"Dec  7 01:00:06 n1 postfix/smtpd[127]: lost connection after CONNECT from x[10.97.0.4]",
        b"Dec  7 01:00:07 n1 postfix/qmgr[12]: 4F1: from=<a@b>, size=1, nrcpt=1 (queue active)",
        b"\xff\xfe not a log line at all",
        b"",
    ]
    assert connect_events(lines) == [["connections", "10.97.0.2", 2], ["connections", "10.97.0.3", 1],
                                     ["connections", "2001:db8::1", 1]]
    assert connect_events([]) == []
    assert connect_events(lines[5:]) == []


@hsettings(max_examples=120, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=120),
                          st.builds(lambda pre, ip, post: pre + b"postfix/smtpd[1]: connect from h[" + ip + b"]" + post,
                                    st.binary(max_size=20), st.binary(max_size=20), st.binary(max_size=20))),
                max_size=20))
def test_connect_events_never_raise(lines):
    events = connect_events(lines)
    assert sum(n for _, _, n in events) <= len(lines)
    for kind, ip, n in events:
        assert kind == "connections" and isinstance(ip, str) and ip and n >= 1
    assert [ip for _, ip, _ in events] == sorted({ip for _, ip, _ in events})


@pytest.mark.parametrize("garbage", [None, "x", 3, [], [1, 2], {"ino": -1}, {"offset": True},
                                     {"ino": "3", "offset": 2.5, "seq": "7", "pending": [], "audit": "x"},
                                     {"pending": {"ino": 1, "start": "0", "end": 9}},
                                     {"audit": {"ino": 1, "start": 0}}, {"seq": True},
                                     {"lost_lines_alarms": -3}])
def test_tail_state_from_garbage_gives_defaults(garbage):
    assert TailState.from_json(garbage) == TailState()


def test_tail_state_round_trip():
    st_ = TailState(ino=7, offset=1234, seq=-1, pending={"ino": 7, "start": 1000, "end": 1234, "lines": 3},
                    audit={"ino": 7, "start": 900, "end": 1000}, lost_lines_alarms=2)
    assert TailState.from_json(st_.to_json()) == st_
    mixed = TailState.from_json({"ino": 5, "offset": -1, "seq": 9, "pending": {"ino": 1}})
    assert mixed == TailState(ino=5, seq=9)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(["ino", "offset", "seq", "pending", "audit", "start",
                                                              "end", "lines", "lost_lines_alarms", "x"]),
                                             inner, max_size=6),
                           max_leaves=20)


@hsettings(max_examples=120, deadline=None)
@given(json_values)
def test_tail_state_from_json_never_raises(value):
    s = TailState.from_json(value)
    for k in ("ino", "offset", "lost_lines_alarms"):
        v = getattr(s, k)
        assert type(v) is int and v >= 0
    assert s.seq is None or type(s.seq) is int
    for k in ("pending", "audit"):
        v = getattr(s, k)
        assert v is None or all(isinstance(v[x], int) for x in ("ino", "start", "end"))


def test_audit_sender():
    assert audit_sender("n1", 42) == "postfix-n1-42"
    assert audit_sender("n1", 42) != audit_sender("n1", 43) != audit_sender("n2", 43)


def test_service_batches_resume_exactly_after_a_cut_piece(tmp_path):
    """The service's reader, batch after batch, over a log with lines longer than MAX_LINE
    (made small here): the batches put together are the file, byte for byte."""
    from ecluster_postfix import service
    svc, _ = postfix_service(tmp_path, "")
    svc.paths.log_dir.mkdir(parents=True)
    data = b"a\nbbbbbbb\ncc\n" + b"d" * 9 + b"\neeee\n"
    svc.paths.maillog.write_bytes(data)
    got = []
    with mock.patch.object(maillog, "MAX_LINE", 4), mock.patch.object(service, "MAX_BATCH_LINES", 2):
        while (batch := svc._next_batch()) is not None:
            ino, start, end, lines = batch
            assert start == svc.state.offset and ino == os.stat(svc.paths.maillog).st_ino
            got.append((start, end, lines))
            svc.state.offset = end
            assert len(got) < 20
    assert svc.state.offset == len(data)
    pieces = [ln for _, _, lines in got for ln in lines]
    assert pieces == [b"a", b"bbbb", b"bbb", b"cc", b"dddd", b"dddd", b"d", b"eeee"]
    assert [(s, e) for s, e, _ in got] == [(0, 6), (6, 13), (13, 21), (21, 28)]


def test_service_partly_landed_batch_resumes_at_the_next_line(tmp_path):
    """A journal write whose answer is lost, with only some lines landed: the position moves
    to the first line that did not land, also when a landed line was a cut piece."""
    from bus.client import CallTimeout
    svc, _ = postfix_service(tmp_path, "")
    svc.paths.log_dir.mkdir(parents=True)
    data = b"bbbbbbb\ncc\n"
    svc.paths.maillog.write_bytes(data)
    seqs = [10, 11]            # before the write; after the lost answer: one line landed
    writes = []

    async def call(member, service_, method, timeout=None, **args):
        if method == "status":
            return {"logs": {"mainlog": {"last_seq": seqs.pop(0)}}}
        if method == "write":
            writes.append(args["records"])
            raise CallTimeout(member or "n1", service_, method, timeout)
        raise AssertionError(method)

    svc.call = call
    with mock.patch.object(maillog, "MAX_LINE", 4):
        ino, start, end, lines = svc._next_batch()
        assert lines == [b"bbbb", b"bbb", b"cc"] and end == len(data)
        asyncio.run(svc._ship(ino, start, end, lines))
    assert writes == [[b"bbbb", b"bbb", b"cc"]] and seqs == []
    assert svc.state.offset == 4 and svc.state.seq == 11 and svc.state.pending is None
    assert svc.counters["lines"] == 1


# -- the service refusing to run ------------------------------------------------------------

def postfix_service(tmp_path: Path, table: str):
    from ecluster_postfix.service import PostfixService
    text = CLUSTER + "[services.postfix]\n" + table
    cluster = parse_cluster(text, tmp_path / "cluster.toml")
    svc = PostfixService(cluster, "n1")
    alarms: list[tuple[str, str, dict]] = []

    async def alarm(kind, message, **details):
        alarms.append((kind, message, details))

    svc.alarm = alarm

    async def no_bus(*a, **kw):
        raise AssertionError(f"the refusing service used the bus: {a}")

    svc.call = svc.cast = svc.publish = no_bus
    return svc, alarms


def refuse(svc, alarms) -> str:
    asyncio.run(svc.handle_init())
    assert len(alarms) == 1, alarms
    kind, message, _ = alarms[0]
    assert kind == "postfix.refused"
    assert "\n" not in message and "\n" not in svc.refused
    assert svc.refused in message and message.startswith("postfix on n1: ")
    status = svc.rpc_status()
    assert status["refused"] == svc.refused and status["running"] is False and status["pid"] is None
    assert not (svc.data_dir / "postfix").exists()         # nothing prepared, nothing started
    assert not hasattr(svc, "tail_task")
    # a refusing service stays quiet: ticks and VIP changes do nothing, stop returns
    asyncio.run(svc.handle_tick())
    asyncio.run(svc.handle_vips({"injection": ("10.99.0.100",), "outbound": ()}))
    asyncio.run(svc.handle_stop())
    assert len(alarms) == 1
    return svc.refused


def test_service_refuses_a_missing_postfix(tmp_path):
    svc, alarms = postfix_service(tmp_path, 'postfix = "/nonexistent/postfix"\n')
    assert svc.refused is None and svc.settings is not None     # the settings are fine
    why = refuse(svc, alarms)
    assert "/nonexistent/postfix" in why and "not installed" in why


def test_service_refuses_a_missing_maildir_owner(tmp_path):
    for path in ("/usr/sbin/postfix", "/usr/sbin/postconf", "/usr/lib/postfix/sbin/master"):
        if not os.path.exists(path):
            pytest.skip(f"{path} is missing: the missing Postfix is refused first")
    import pwd
    user = "eclnouser"
    with pytest.raises(KeyError):
        pwd.getpwnam(user)
    svc, alarms = postfix_service(tmp_path, f'maildir_owner = "{user}"\n')
    why = refuse(svc, alarms)
    assert f"'services.postfix.maildir_owner'" in why and repr(user) in why
