"""The registry of plugins: a name in the config maps to exactly one class."""

from agent.plugins.dns import DnsPlugin
from agent.plugins.drops import DropsPlugin
from agent.plugins.forward import ForwardPlugin
from agent.plugins.http import HttpPlugin
from agent.plugins.pods import PodsPlugin
from agent.plugins.tcp import TcpPlugin

REGISTRY = {cls.name: cls for cls in (ForwardPlugin, DropsPlugin, PodsPlugin, TcpPlugin, DnsPlugin, HttpPlugin)}
