"""The service-mesh sidecar: a second role on the proxy engine, beside each service instance.

It routes an app's outbound calls to the instances of other services (Envoy's router and
cluster manager) and guards its own instance's inbound side. It imports ``meshgate.proxy``
and ``meshgate.config``, never another role.
"""
