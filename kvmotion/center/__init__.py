"""The control plane (`kvmotion center`): one source of cluster truth.

store.py      the Store protocol and its SQLite implementation
auth.py       join tokens and passwords (pure)
liveness.py   when a host is silent, what a heartbeat changes (pure)
heartbeat.py  the loop that marks silent hosts not responding
service.py    the center's operations (join, login, heartbeats, datastores, users, tokens, events)
tasks.py      VMs, migrations and tasks: requests become queued tasks
placement.py  which host a VM goes to, with every host's reasons (pure)
admission.py  which queued migrations may start under the hosts' budgets (pure)
dispatcher.py the controller that carries tasks out through the agents, and the reconcile pass
app.py        its HTTP API (FastAPI, served by kvmotion.api.serving)
serve.py      the data folder, the first start, `kvmotion center serve`
"""
