"""tinyalign_ros: speech aligned straight into a small LLM, personalized on the robot."""
import pkgutil

# The generated interfaces (tinyalign_ros.msg / .srv) are installed into site-packages by the
# cmake build, while the sources may run from the checkout: let both halves form one package.
__path__ = pkgutil.extend_path(__path__, __name__)
