from setuptools import find_packages, setup

setup(
    name="cluster",
    version="0.1.0",
    description=(
        "Service discovery and load balancing for Python web apps on gevent, "
        "compatible with meteorhacks:cluster"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["cluster", "cluster.*"]),
    package_data={"cluster": ["py.typed"]},
    install_requires=[
        "gevent>=22.10",
        "gevent-websocket>=0.10.1",
        "pymongo>=4.0",
        "requests>=2.25",
        "ConfigArgParse>=1.5",
        "prometheus_client>=0.17",
    ],
    extras_require={
        # gunicorn's gevent worker imports `packaging` (gunicorn 23+) without requiring it
        "gunicorn": ["gunicorn>=21.2", "packaging"],
        "test": [
            "pytest>=7.4",
            "pytest-timeout>=2.1",
            "gunicorn>=21.2",
            "packaging",
            "websocket-client>=1.6",
            # the real-time tests and examples (tests/sio, examples/)
            "python-socketio[client]>=5.8",
            "Flask>=2.2",
            "Flask-SocketIO>=5.3",
            "Flask-Sockets>=0.2.1",
            "hypothesis>=6.80",
            # cluster.discover() through a SOCKS proxy, as requests[socks] does it
            "PySocks>=1.5.6",
        ],
    },
    entry_points={"console_scripts": ["cluster = cluster.entry:main"]},
    scripts=["scripts/cluster-instance"],
    classifiers=[
        "Framework :: gevent",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: WWW/HTTP :: WSGI :: Middleware",
        "Topic :: System :: Distributed Computing",
    ],
)
