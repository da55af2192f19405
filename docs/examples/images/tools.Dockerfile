# An image for the example suite: the host's own system plus one tool, built with the layer
# cache the first time a test needs it (FROM host keeps it small and works anywhere).
FROM host
RUN mkdir -p /opt/tools \
 && printf '#!/bin/sh\necho "hello from $(cat /etc/tools-release)"\n' > /opt/tools/greet \
 && chmod +x /opt/tools/greet \
 && echo "the tools image" > /etc/tools-release
ENV PATH=/opt/tools:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
